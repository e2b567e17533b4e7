"""Layer groups: angular layer similarity, exact contiguous grouping, one SAE per group in `sae train`."""
import itertools
import json
import math

import pytest
import torch

import analysis
import sae
from sae.app import layer_groups
from sae.app.cli import main
from sae.trainer import Trainer


def _reference_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Token by token: 1 - angle / pi, averaged."""
    values = [1 - math.acos(max(-1.0, min(1.0, float(torch.cosine_similarity(x.double(), y.double(), dim=0))))) / math.pi for x, y in zip(a, b)]
    return sum(values) / len(values)


def test_angular_similarity_matches_a_token_by_token_reference():
    torch.manual_seed(0)
    x = torch.randn(50, 12)
    acts = {"a": x, "b": x + 0.5 * torch.randn(50, 12), "c": torch.randn(50, 12), "d": -x, "e": 3 * x}
    sim = analysis.angular_similarity(acts)
    names = list(acts)
    for i, j in itertools.product(range(len(names)), repeat=2):
        assert sim[i, j].item() == pytest.approx(_reference_similarity(acts[names[i]], acts[names[j]]), abs=1e-5)
    assert sim[0, 4].item() == pytest.approx(1.0, abs=1e-6)  # identical directions (a scaled copy)
    assert sim[0, 3].item() == pytest.approx(0.0, abs=1e-6)  # opposite
    assert torch.equal(sim, sim.T) and torch.all(sim.diagonal() == 1)


def _brute_force(similarity: torch.Tensor, n_groups: int) -> tuple[float, list[list[int]]]:
    """Every way to cut L ordered layers into n_groups contiguous runs; the least summed pairwise distance."""
    n = similarity.shape[0]
    distance = 1 - similarity.double()
    best = (math.inf, [])
    for cuts in itertools.combinations(range(1, n), n_groups - 1):
        bounds = [0, *cuts, n]
        groups = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        cost = sum(float(distance[i, j]) for g in groups for i, j in itertools.combinations(g, 2))
        best = min(best, (cost, groups), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("n_layers", [5, 7])
def test_grouping_is_the_brute_force_optimum(n_layers):
    generator = torch.Generator().manual_seed(n_layers)
    for trial in range(4):
        # Random similarities that fall with layer distance, as in a residual stream, plus noise.
        gaps = torch.rand(n_layers - 1, generator=generator).cumsum(0)
        position = torch.cat([torch.zeros(1), gaps])
        sim = 1 - (position[:, None] - position[None, :]).abs() / (2 * position[-1])
        noise = 0.05 * torch.rand(n_layers, n_layers, generator=generator)
        sim = (sim - noise - noise.T).fill_diagonal_(1)
        for n_groups in range(1, n_layers + 1):
            groups = analysis.group_layers(sim, n_groups)
            assert [layer for g in groups for layer in g] == list(range(n_layers))  # contiguous, in order, complete
            assert len(groups) == n_groups and all(groups)
            cost, expected = _brute_force(sim, n_groups)
            distance = 1 - sim.double()
            got = sum(float(distance[i, j]) for g in groups for i, j in itertools.combinations(g, 2))
            assert got == pytest.approx(cost, abs=1e-9) and groups == expected


def test_grouping_finds_planted_blocks_and_rejects_bad_counts():
    blocks = [3, 1, 4]
    sim = torch.full((8, 8), 0.2)
    start = 0
    for size in blocks:
        sim[start : start + size, start : start + size] = 0.95
        start += size
    sim.fill_diagonal_(1)
    assert analysis.group_layers(sim, 3) == [[0, 1, 2], [3], [4, 5, 6, 7]]
    assert analysis.amad(sim, [[0, 1, 2], [3], [4, 5, 6, 7]]) == pytest.approx((0.05 + 0 + 0.05) / 3)
    with pytest.raises(ValueError, match="n_groups must be between 1 and"):
        analysis.group_layers(sim, 9)


def test_group_batches_take_rows_from_every_member():
    """Row r of site blocks.L is tagged (L, r): `all` keeps every member's row of every token, `one`
    keeps each token once, from a member layer."""
    batch_size, d = 64, 4
    sites = [f"blocks.{layer}.hook_resid_post" for layer in range(5)]
    tagged = {s: torch.stack([torch.full((batch_size,), float(layer)), torch.arange(batch_size).float()], 1).repeat(1, d // 2)
              for layer, s in enumerate(sites)}
    groups = {"blocks.0-2.hook_resid_post": sites[:3], "blocks.3-4.hook_resid_post": sites[3:]}
    out = next(layer_groups.group_batches(iter([tagged]), groups, "all", seed=0))
    first = out["blocks.0-2.hook_resid_post"]
    assert first.shape == (3 * batch_size, d)
    assert torch.bincount(first[:, 0].long()).tolist() == [batch_size] * 3
    assert sorted(first[:, 1].tolist()) == sorted(list(range(batch_size)) * 3)
    out = next(layer_groups.group_batches(iter([tagged]), groups, "one", seed=0))
    first = out["blocks.0-2.hook_resid_post"]
    assert first.shape == (batch_size, d) and first[:, 1].tolist() == list(range(batch_size))
    assert set(first[:, 0].long().tolist()) == {0, 1, 2}
    assert set(out["blocks.3-4.hook_resid_post"][:, 0].long().tolist()) == {3, 4}


def test_bad_layer_group_options_are_clear_errors():
    with pytest.raises(ValueError, match="auto:G with a positive"):
        layer_groups.parse_spec("auto:x")
    with pytest.raises(ValueError, match=r"names layer\(s\) \[3\] twice"):
        layer_groups.parse_spec("0-3,3-5")
    with pytest.raises(ValueError, match="rising range"):
        layer_groups.parse_layers("5-2")
    with pytest.raises(ValueError, match="needs the layers to group"):
        layer_groups.check_options(None, "auto:2", "all", None)
    with pytest.raises(ValueError, match="layer_group_rows"):
        layer_groups.check_options("0-3", "auto:2", "some", None)
    assert layer_groups.member_sites(None, "0-1,2", None) == [f"blocks.{i}.hook_resid_post" for i in range(3)]


def test_grouped_run_trains_one_sae_per_group_on_every_member(tmp_path, tiny_lm, monkeypatch, capsys):
    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    seen: dict[int, list[int]] = {}
    step = Trainer.train_step

    def counting_step(self, x):
        seen.setdefault(id(self), []).append(x.shape[0])
        return step(self, x)

    monkeypatch.setattr(Trainer, "train_step", counting_step)
    run = tmp_path / "run"
    batch_size = 128
    assert main([
        "train", "--model", str(model_dir), "--layer-groups", "0-2,3", "--n-tokens", "1024",
        "--batch-size", str(batch_size), "--context-len", "32", "--expansion-factor", "2", "--k", "4",
        "--no-wandb", "--out-dir", str(run), "--log-every", "4",
    ]) == 0
    names = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != "stream_state")
    assert names == ["blocks.0-2.hook_resid_post", "blocks.3.hook_resid_post"]
    assert sorted(sorted(set(rows)) for rows in seen.values()) == [[batch_size], [3 * batch_size]]  # k rows per token
    assert all(len(rows) == 1024 // batch_size for rows in seen.values())
    group = sae.load(run / "blocks.0-2.hook_resid_post")
    assert group.metadata["sites"] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert group.metadata["site"] == "blocks.0.hook_resid_post"
    config = json.loads((run / "run_config.json").read_text())
    assert config["layer_groups"]["groups"]["blocks.0-2.hook_resid_post"] == group.metadata["sites"]
    similarity = torch.tensor(config["layer_groups"]["similarity"])
    assert similarity.shape == (4, 4) and torch.allclose(similarity.diagonal(), torch.ones(4))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("blocks.0-2.hook_resid_post/ce_loss_score@blocks.2.hook_resid_post" in line for line in lines)

    # sae eval on a group SAE: one report per member layer, unless --site picks one.
    capsys.readouterr()
    flags = ["--n-tokens", "128", "--no-absorption", "--no-probing", "--no-contrastive", "--no-downstream", "--wandb-mode", "disabled"]
    assert main(["eval", str(run / "blocks.0-2.hook_resid_post"), *flags, "--out", str(tmp_path / "eval")]) == 0
    reports = sorted(p.parent.name for p in (tmp_path / "eval").rglob("report.json"))
    assert reports == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert main(["eval", str(run / "blocks.0-2.hook_resid_post"), "--site", "blocks.1.hook_resid_post", *flags,
                 "--out", str(tmp_path / "one")]) == 0
    assert [p.parent.name for p in (tmp_path / "one").rglob("report.json")] == ["blocks.0-2.hook_resid_post"]


@pytest.mark.real_model
def test_adjacent_layers_of_the_default_model_are_most_alike(default_lm):
    layers = [2, 3, 4, 14, 15, 16, 26, 27]
    sim = analysis.layer_similarity(default_lm, [f"blocks.{i}.hook_resid_post" for i in layers], n_tokens=512, context_len=64)
    index = {layer: i for i, layer in enumerate(layers)}
    for a, b, far in [(14, 15, 27), (15, 16, 3), (3, 4, 15), (26, 27, 14)]:
        assert sim[index[a], index[b]] > sim[index[a], index[far]] + 0.02, (a, b, far)
    groups = analysis.group_layers(sim, 3)
    assert [i for g in groups for i in g] == list(range(len(layers)))
    assert [[layers[i] for i in g] for g in groups] == [[2, 3, 4], [14, 15, 16], [26, 27]]


def test_grouped_run_on_saved_layers_resumes_to_identical_weights(tmp_path, monkeypatch):
    """From a tensor file of four layers (two pairs of near-copies): auto:2 pairs them, and with
    one random member row per token an interrupted run resumes bit-identically."""
    from safetensors.torch import save_file

    from sae.synthetic import SyntheticData

    generator = torch.Generator().manual_seed(0)
    first, second = SyntheticData(d=16, n_features=32).sample(2048), SyntheticData(d=16, n_features=32, seed=1).sample(2048)
    layers = [first, first + 0.1 * torch.randn(2048, 16, generator=generator), second, second + 0.1 * torch.randn(2048, 16, generator=generator)]
    save_file({f"blocks.{i}.hook_resid_post": x for i, x in enumerate(layers)}, str(tmp_path / "acts.safetensors"))
    args = ["train", "--activations", str(tmp_path / "acts.safetensors"), "--model", "tiny", "--layer-groups", "auto:2",
            "--layer-group-rows", "one", "--layers", "0-3", "--n-tokens", "5120", "--batch-size", "256", "--k", "4",
            "--expansion-factor", "2", "--no-wandb", "--log-every", "7"]
    assert main(args + ["--out-dir", str(tmp_path / "full")]) == 0
    assert sorted(p.name for p in (tmp_path / "full").iterdir() if p.is_dir()) == [
        "blocks.0-1.hook_resid_post", "blocks.2-3.hook_resid_post",
    ]
    original = Trainer.train_step

    def interrupt_at_11(self, x):
        if self.step == 11:
            raise KeyboardInterrupt
        original(self, x)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_11)
    assert main(args + ["--out-dir", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(Trainer, "train_step", original)
    assert json.loads((tmp_path / "cut" / "run_config.json").read_text())["data"]["layer_groups"] == "0-1,2-3"
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-wandb"]) == 0
    for group in ("blocks.0-1.hook_resid_post", "blocks.2-3.hook_resid_post"):
        full, resumed = sae.load(tmp_path / "full" / group), sae.load(tmp_path / "cut" / group)
        for name, tensor in full.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], tensor), (group, name)
