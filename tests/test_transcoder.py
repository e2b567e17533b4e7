"""Transcoders: on a planted sparse map from one site to another they recover it (the skip
transcoder also its dense linear part), their kernel path matches plain autograd, and saving
folds both scales."""
import copy
import json
from dataclasses import dataclass

import pytest
import torch

import activations
import analysis
import sae


@dataclass
class PlantedMap:
    """x = codes · D_in + offset + dense noise; y = codes · D_out + b_out (+ x · A^T with a skip).
    The codes are sparse and non-negative, so a transcoder can read them off x and write y."""

    d: int = 16
    n_features: int = 24
    active: float = 2.0
    dense_noise: float = 0.01
    skip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        g = self.generator = torch.Generator().manual_seed(self.seed)
        unit = lambda t: t / t.norm(dim=-1, keepdim=True)
        self.D_in = unit(torch.randn(self.n_features, self.d, generator=g))
        self.D_out = unit(torch.randn(self.n_features, self.d, generator=g))
        self.offset, self.b_out = torch.randn(self.d, generator=g), torch.randn(self.d, generator=g)
        self.A = 3 * torch.randn(self.d, self.d, generator=g) / self.d**0.5 if self.skip else None

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        on = torch.rand(n, self.n_features, generator=g) < self.active / self.n_features
        codes = on * (1.0 + torch.rand(n, self.n_features, generator=g))
        x = codes @ self.D_in + self.offset + self.dense_noise * torch.randn(n, self.d, generator=g)
        y = codes @ self.D_out + self.b_out
        if self.A is not None:
            y = y + x @ self.A.T
        return x, 7.0 * y  # a different scale from x: the two scales must be kept apart


def fit(arch: str, data: PlantedMap, steps: int = 300, batch: int = 512, target_only: bool = False) -> sae.BaseSAE:
    """Train `arch` on (x, y) pairs, or on y alone with `target_only` (a plain SAE of the target)."""
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture=arch, d_in=data.d, n_latents=2 * data.n_features, k=3))
    train_cfg = sae.TrainConfig(lr=1e-2, warmup_steps=20, dead_tokens=5000, log_every=10**9, b_dec_init="mean")
    pairs = [data.sample(batch) for _ in range(steps)]
    sae.Trainer(model, train_cfg).fit([y for _, y in pairs] if target_only else pairs, progress=False)
    return model.eval()


@torch.no_grad()
def held_out_fvu(model: sae.BaseSAE, data: PlantedMap, n: int = 4096) -> float:
    x, y = data.sample(n)
    return sae.fvu(y, model(x)).item()


def test_transcoder_recovers_a_planted_sparse_map():
    data = PlantedMap()
    model = fit("transcoder", data)
    dec = model.decoder_directions()
    cos = data.D_out @ (dec / dec.norm(dim=-1, keepdim=True)).T
    assert (cos.max(dim=-1).values > 0.9).float().mean() >= 0.9
    # Predicting y from x is about as good as a TopK SAE reconstructing y from y itself (the
    # residual FVU of both is TopK's: k=3 codes for a varying number of active features).
    # Measured: 0.15 vs 0.09.
    reference_sae = fit("topk", data, target_only=True)
    _, y = data.sample(4096)
    with torch.no_grad():
        reference = sae.fvu(y, reference_sae(y)).item()
    assert held_out_fvu(model, data) < reference + 0.1
    assert model.input_scale != model.target_scale  # each scaled on its own


def test_skip_transcoder_recovers_the_dense_linear_part_in_w_skip():
    data = PlantedMap(skip=True, dense_noise=0.3)
    skip = fit("skip_transcoder", data, steps=400)
    plain = fit("transcoder", data, steps=400)
    # In raw units y = ... + x · W_skip^T, and the target is 7·y: the planted skip is 7·A. Latents
    # left over by the sparse part can carry a little of a linear map too (ReLU pieces), so W_skip
    # matches it in direction, not exactly (measured: cosine 0.93, relative error 0.37).
    w_skip = skip.folded_state_dict()["W_skip"]
    assert torch.nn.functional.cosine_similarity(w_skip.flatten(), 7 * data.A.flatten(), dim=0) > 0.9
    # Without the skip, k=3 latents cannot carry a dense map (measured: FVU 0.03 vs 0.21).
    assert held_out_fvu(skip, data) < 0.05 and held_out_fvu(plain, data) > 0.15


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_kernel_path_gradients_match_plain_autograd(arch):
    torch.manual_seed(1)
    cfg = dict(architecture=arch, d_in=8, n_latents=32, k=4, k_aux=6)
    fast = sae.create(sae.SAEConfig(**cfg, kernel_backend="torch"))
    ref = sae.create(sae.SAEConfig(**cfg, kernel_backend="reference"))
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_()
        fast.input_scale.fill_(0.5)
        fast.target_scale.fill_(3.0)
    ref.load_state_dict(fast.state_dict())
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    for model in (fast, ref):
        model.loss(x, dead_mask=dead, target=y).loss.backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_save_folds_both_scales_and_loads_back(arch, tmp_path):
    data = PlantedMap(skip=arch == "skip_transcoder")
    model = fit(arch, data, steps=20)
    model.metadata = {"site": "blocks.3.mlp.hook_in", "target_site": "blocks.3.hook_mlp_out"}
    model.save(tmp_path / "tc")
    loaded = sae.load(tmp_path / "tc")
    assert loaded.input_scale == 1 and loaded.target_scale == 1 and loaded.metadata == model.metadata
    x, _ = data.sample(256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=1e-4, atol=1e-4)


def test_trainer_refuses_a_missing_or_unexpected_target():
    x = torch.randn(64, 8)
    transcoder = sae.Trainer(sae.create(sae.SAEConfig(architecture="transcoder", d_in=8, n_latents=16, k=2)))
    with pytest.raises(ValueError, match="needs a target"):
        transcoder.train_step(x)
    topk = sae.Trainer(sae.create(sae.SAEConfig(architecture="topk", d_in=8, n_latents=16, k=2)))
    with pytest.raises(ValueError, match="takes no target"):
        topk.train_step(x, x)


def test_evaluate_splices_the_prediction_in_place_of_the_target_site(tiny_lm):
    """A 'transcoder' whose prediction is the true MLP of its input scores exactly like the clean
    model; a zero-initialised skip transcoder (prediction = b_dec = 0) scores like the ablation."""
    mlp = copy.deepcopy(tiny_lm.model.model.layers[1].mlp)  # a copy: the splice hooks sit on the original

    class ExactMLP(sae.Transcoder):
        def forward(self, x):
            return mlp(x)

    site, target = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    options = dict(texts=activations.default_texts(limit=20), n_tokens=64, context_len=32, split="all",
                   absorption=False, probing=False, contrastive=False, progress=False)
    exact = ExactMLP(sae.SAEConfig(architecture="transcoder", d_in=tiny_lm.d_model, n_latents=96, k=8))
    exact.metadata = {"site": site, "target_site": target}
    report = analysis.evaluate(exact, tiny_lm, site, **options)
    assert report["fvu"] < 1e-10 and report["meta"]["target_site"] == target
    assert report["ce_sae"] == pytest.approx(report["ce_clean"], abs=1e-5) and report["kl_sae"] < 1e-8
    assert report["ce_zero"] > report["ce_clean"]  # the zero ablation replaced mlp_out, not mlp.hook_in
    zero = sae.create(sae.SAEConfig(architecture="skip_transcoder", d_in=tiny_lm.d_model, n_latents=96, k=8))
    with torch.no_grad():
        zero.W_dec.zero_()
    report = analysis.evaluate(zero, tiny_lm, site, target_site=target, **options)
    assert report["ce_sae"] == pytest.approx(report["ce_zero"], abs=1e-5) and report["ce_loss_score"] == pytest.approx(0, abs=1e-4)
    zero.metadata = {}
    with pytest.raises(ValueError, match="records no target site"):
        analysis.evaluate(zero, tiny_lm, site, **options)


def test_cli_trains_transcoders_from_a_cache_and_a_live_model_and_eval_needs_no_flags(tmp_path, tiny_lm, capsys):
    from sae.app.cli import main

    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    site, target = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    common = ["--sites", site, "--target-sites", target, "--n-tokens", "1024", "--batch-size", "256",
              "--expansion-factor", "2", "--k", "8", "--no-wandb", "--log-every", "2", "--lr", "3e-3", "--warmup-steps", "2"]
    assert main(["cache", "--model", str(model_dir), "--sites", site, target, "--tokens", "2048",
                 "--context-len", "32", "--out", str(tmp_path / "cache")]) == 0
    assert main(["train", "--architecture", "transcoder", "--activations", str(tmp_path / "cache"), *common,
                 "--out-dir", str(tmp_path / "cached")]) == 0
    assert main(["train", "--architecture", "skip_transcoder", "--model", str(model_dir), "--context-len", "32",
                 *common, "--out-dir", str(tmp_path / "live")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    fvus = [line["fvu"] for line in lines if "fvu" in line]
    assert "ce_loss_score" in lines[-1] and fvus[-1] < fvus[0]
    for run in ("cached", "live"):
        loaded = sae.load(tmp_path / run / site)
        assert loaded.metadata["site"] == site and loaded.metadata["target_site"] == target
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "live" / site / "sae"), "--n-tokens", "128", "--no-absorption",
                 "--no-probing", "--no-contrastive", "--wandb-mode", "disabled", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / f"live/{site}" / "report.json").read_text())
    # (Quality is the real-model test's job: 8 steps on a random tiny model learn little.)
    assert report["meta"]["target_site"] == target and all(report[k] == report[k] for k in ("fvu", "ce_loss_score"))
    with pytest.raises(SystemExit, match="--target-sites"):
        main(["train", "--architecture", "transcoder", "--activations", str(tmp_path / "cache"), "--sites", site,
              "--no-wandb", "--out-dir", str(tmp_path / "bad")])


@pytest.mark.real_model
def test_transcoder_of_a_default_model_mlp_beats_the_mean_and_splices_in(default_lm):
    """Layer 3's MLP of SmolLM2, both sites from one forward pass per batch."""
    site, target = "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out"
    stream = activations.stream(default_lm, [site, target], n_tokens=8192, batch_size=512, context_len=64,
                                progress=False)
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture="skip_transcoder", d_in=default_lm.d_model, n_latents=1152, k=16))
    sae.Trainer(model, sae.TrainConfig(lr=5e-3, warmup_steps=3, log_every=10**9)).fit(
        [(batch[site], batch[target]) for batch in stream], progress=False
    )
    model.metadata = {"site": site, "target_site": target}
    report = analysis.evaluate(model, default_lm, site, n_tokens=1024, absorption=False, probing=False,
                               contrastive=False, progress=False)
    # Predicting the mean output has FVU 1 (zero: more); the spliced prediction beats zero-ablating
    # the MLP. Measured after these 16 steps: FVU 0.83, CE-loss score 0.74.
    assert report["fvu"] < 0.93 and report["l0"] == pytest.approx(16, abs=0.5)
    assert 0.4 < report["ce_loss_score"] <= 1.05 and report["ce_sae"] < report["ce_zero"]


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_sparsify_format_holds_the_transcoder_as_sparsify_runs_it(arch, tmp_path):
    data = PlantedMap(skip=arch == "skip_transcoder")
    model = fit(arch, data, steps=20)
    model.save(tmp_path / "layers.3.mlp", format="sparsify")
    cfg = json.loads((tmp_path / "layers.3.mlp" / "cfg.json").read_text())
    assert cfg["transcode"] and cfg["skip_connection"] == (arch == "skip_transcoder")
    # sparsify's transcoder forward, written out: no b_dec on the input, ReLU, top-k, decode, + x W_skip^T.
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "layers.3.mlp" / "sae.safetensors"))
    x, _ = data.sample(256)
    pre = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(model.cfg.k, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, idx, vals) @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        expected += x @ w["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    # Read back without our own section, the folder name gives both sites.
    del cfg["sae_toolkit"]
    (tmp_path / "layers.3.mlp" / "cfg.json").write_text(json.dumps(cfg))
    loaded = sae.load(tmp_path / "layers.3.mlp")
    assert type(loaded) is type(model)
    assert loaded.metadata == {"site": "blocks.3.mlp.hook_in", "target_site": "blocks.3.hook_mlp_out"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)
