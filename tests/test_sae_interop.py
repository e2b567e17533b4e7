"""SAELens and sparsify folders: round trips, the peers' own forward passes, refusals, orientation."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import activations
import sae
from sae.synthetic import SyntheticData

ARCHS = ["topk", "batchtopk", "jumprelu", "relu"]
MATRIX = [("saelens", arch) for arch in ARCHS] + [("sparsify", "topk")]


def trained(arch: str, d: int = 16, n: int = 48, k: int = 4, seed: int = 0) -> sae.BaseSAE:
    """A briefly trained SAE on activations of a large norm, so input_scale != 1 must be folded."""
    torch.manual_seed(seed)
    model = sae.create(sae.SAEConfig(architecture=arch, d_in=d, n_latents=n, k=k))
    batches = [b * 40.0 + 3.0 for b in SyntheticData(d=d, n_features=32).batches(30, 64)]
    sae.Trainer(model, sae.TrainConfig(lr=3e-3, warmup_steps=2, log_every=10**9)).fit(batches, progress=False)
    model.metadata = {"model": "tiny", "site": "blocks.1.hook_resid_post"}
    return model.eval()


def sample(d: int = 16, n: int = 200) -> torch.Tensor:
    return SyntheticData(d=d, n_features=32, seed=1).sample(n) * 40.0 + 3.0


# -- plain reimplementations of the peers' forward passes (from their sources), on their files --
def saelens_forward(folder, x):
    """SAELens 6: TopKSAE / JumpReLUSAE / StandardSAE encode + decode, with its cfg options."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae_weights.safetensors")
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * w["W_dec"].norm(dim=-1)
        vals, idx = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if cfg.get("rescale_acts_by_decoder_norm"):
            z = z / w["W_dec"].norm(dim=-1)
    elif cfg["architecture"] == "jumprelu":
        z = pre.relu() * (pre > w["threshold"])
    else:
        z = pre.relu()
    return z @ w["W_dec"] + w["b_dec"]


def sparsify_forward(folder, x):
    """sparsify SparseCoder: relu(encoder(x - b_dec)), top-k, embedding_bag decode of W_dec."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae.safetensors")
    pre = F.relu(F.linear(x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]))
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    return F.embedding_bag(idx, w["W_dec"], per_sample_weights=vals, mode="sum") + w["b_dec"]


PEER_FORWARD = {"saelens": saelens_forward, "sparsify": sparsify_forward}


@pytest.mark.parametrize("fmt,arch", MATRIX)
def test_round_trip_is_identical_and_peer_forward_agrees(tmp_path, fmt, arch):
    model = trained(arch)
    model.save(tmp_path / "native")
    model.save(tmp_path / fmt, format=fmt)
    native, loaded = sae.load(tmp_path / "native"), sae.load(tmp_path / fmt).eval()
    assert type(loaded) is type(model) and loaded.cfg == model.cfg and loaded.metadata == model.metadata
    for name, tensor in native.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = sample()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=1e-5, atol=1e-4)
        # The files mean the same SAE to the peer's own forward pass.
        torch.testing.assert_close(PEER_FORWARD[fmt](tmp_path / fmt, x), model(x), rtol=1e-5, atol=1e-4)
    # Saving what was loaded writes the same files again.
    loaded.save(tmp_path / "again", format=fmt)
    weights = "sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"
    first, second = load_file(tmp_path / fmt / weights), load_file(tmp_path / "again" / weights)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_batchtopk_written_by_saelens_reads_as_jumprelu(tmp_path):
    """Without our metadata (a folder SAELens wrote) a BatchTopK SAE is the JumpReLU it was saved as."""
    model = trained("batchtopk")
    model.save(tmp_path / "lens", format="saelens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    del cfg["metadata"]["sae_toolkit"]
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    loaded = sae.load(tmp_path / "lens").eval()
    assert isinstance(loaded, sae.JumpReLUSAE)
    x = sample()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=1e-5, atol=1e-4)


def write_saelens(folder, cfg, weights):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))


def random_saelens(d=12, n=40, **cfg):
    g = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.randn(n, generator=g) * 0.1,
               "W_dec": torch.randn(n, d, generator=g) * 0.5, "b_dec": torch.randn(d, generator=g)}
    base = {"architecture": "topk", "d_in": d, "d_sae": n, "k": 5, "dtype": "float32", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0", "model_name": "m", "hook_name": "h"}}
    return {**base, **cfg}, weights


@pytest.mark.parametrize("options", [
    {"apply_b_dec_to_input": False},
    {"rescale_acts_by_decoder_norm": True},
    {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True},
    {"architecture": "standard", "apply_b_dec_to_input": False},
    {"architecture": "jumprelu"},
])
def test_saelens_options_are_folded_exactly(tmp_path, options):
    cfg, weights = random_saelens(**options)
    if cfg["architecture"] == "jumprelu":  # negative thresholds included: SAELens ReLUs first
        weights["threshold"] = torch.linspace(-0.5, 1.0, cfg["d_sae"])
    write_saelens(tmp_path / "lens", cfg, weights)
    loaded = sae.load(tmp_path / "lens").eval()
    assert loaded.metadata == {"model": "m", "site": "h"}
    x = torch.randn(64, cfg["d_in"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saelens_forward(tmp_path / "lens", x), rtol=1e-5, atol=1e-5)


def test_saelens_pre_6_topk_config(tmp_path):
    cfg, weights = random_saelens()
    cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "k", "metadata")}
    cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 5}, hook_name="blocks.2.hook_resid_post")
    write_saelens(tmp_path / "old", cfg, weights)
    loaded = sae.load(tmp_path / "old")
    assert isinstance(loaded, sae.TopKSAE) and loaded.cfg.k == 5 and loaded.metadata["site"] == "blocks.2.hook_resid_post"


@pytest.mark.parametrize("change,message", [
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations"),
    ({"normalize_activations": "expected_average_only_in"}, "fold the scaling"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
])
def test_saelens_unsupported_options_are_refused(tmp_path, change, message):
    cfg, weights = random_saelens(**change)
    write_saelens(tmp_path / "lens", cfg, weights)
    with pytest.raises(ValueError, match=message):
        sae.load(tmp_path / "lens")


def write_sparsify(folder, model, **cfg_changes):
    model.save(folder, format="sparsify")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(cfg_changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,message", [
    ({"skip_connection": True}, "skip_connection checkpoints that are not transcoders are not supported"),
    ({"activation": "groupmax"}, "groupmax"),
])
def test_sparsify_unsupported_options_are_refused(tmp_path, change, message):
    write_sparsify(tmp_path / "sp", trained("topk"), **change)
    with pytest.raises(ValueError, match=message):
        sae.load(tmp_path / "sp")


def test_sparsify_run_folder_asks_for_a_hookpoint(tmp_path):
    model = trained("topk")
    model.save(tmp_path / "run" / "layers.3", format="sparsify")
    model.save(tmp_path / "run" / "layers.5.mlp", format="sparsify")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "batch_size": 8}))
    with pytest.raises(ValueError, match=r"sparsify run with one SAE per hookpoint \(layers.3, layers.5.mlp\)"):
        sae.load(tmp_path / "run")
    # Provenance from the folder layout when our own metadata is absent.
    cfg = json.loads((tmp_path / "run" / "layers.5.mlp" / "cfg.json").read_text())
    del cfg["sae_toolkit"]
    (tmp_path / "run" / "layers.5.mlp" / "cfg.json").write_text(json.dumps(cfg))
    loaded = sae.load(tmp_path / "run" / "layers.5.mlp")
    assert loaded.metadata == {"site": "blocks.5.hook_mlp_out", "model": "EleutherAI/pythia-70m"}


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_sparsify_refuses_non_topk(tmp_path, arch):
    with pytest.raises(ValueError, match="sparsify stores TopK SAEs and transcoders only"):
        trained(arch).save(tmp_path / "sp", format="sparsify")
    assert not (tmp_path / "sp").exists()


def test_untrained_batchtopk_has_no_saelens_form(tmp_path):
    model = sae.create(sae.SAEConfig(architecture="batchtopk", d_in=8, n_latents=16, k=2))
    with pytest.raises(ValueError, match="no inference threshold yet"):
        model.save(tmp_path / "lens", format="saelens")


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format 'hf'"):
        trained("topk").save(tmp_path / "x", format="hf")


def test_transposed_decoder_is_detected_by_shape(tmp_path):
    """SAELens' sparsify reader transposes W_dec; a file written that way is refused by name."""
    write_sparsify(tmp_path / "sp", trained("topk"))
    w = load_file(tmp_path / "sp" / "sae.safetensors")
    w["W_dec"] = w["W_dec"].T.contiguous()
    save_file(w, str(tmp_path / "sp" / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"tensor W_dec has shape \(16, 48\).*transposed"):
        sae.load(tmp_path / "sp")


def pca_topk_sae(x: torch.Tensor, k: int) -> sae.TopKSAE:
    """A TopK SAE built from the data, no training: latents are ± the principal directions
    (as many latents as dimensions, so a transposed decoder has the same shape), b_dec the mean."""
    d = x.shape[1]
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    dirs = vh[: d // 2]
    model = sae.create(sae.SAEConfig(d_in=d, n_latents=d, k=k))
    with torch.no_grad():
        model.W_dec.copy_(torch.cat([dirs, -dirs]))
        model.W_enc.copy_(model.W_dec)
        model.b_enc.zero_()
        model.b_dec.copy_(mean)
    return model.eval()


@pytest.mark.real_model
def test_orientation_by_reconstructing_default_model_activations(default_lm, tmp_path):
    site = "blocks.15.hook_resid_post"
    ids = activations.token_windows(default_lm.tokenizer, activations.default_texts(limit=300), 65)[:32]
    x = activations.harvest(default_lm, ids, [site])[site][activations.token_mask(default_lm, ids)]
    fit, held_out = x[:1024], x[1024:]
    model = pca_topk_sae(fit, k=32)
    model.metadata = {"model": "default", "site": site}
    with torch.no_grad():
        fvu = sae.fvu(held_out, model(held_out)).item()
        assert fvu < 0.5, fvu
        for fmt in ("native", "saelens", "sparsify"):
            model.save(tmp_path / fmt, format=fmt)
            loaded = sae.load(tmp_path / fmt)
            assert sae.fvu(held_out, loaded(held_out)).item() == pytest.approx(fvu, abs=1e-6), fmt
        # The SAELens bug: a sparsify decoder read transposed. Same shape here, so only the
        # reconstruction shows it, and it shows it plainly.
        w = load_file(tmp_path / "sparsify" / "sae.safetensors")
        w["W_dec"] = w["W_dec"].T.contiguous()
        save_file(w, str(tmp_path / "sparsify" / "sae.safetensors"))
        wrong = sae.fvu(held_out, sae.load(tmp_path / "sparsify")(held_out)).item()
    assert wrong > fvu + 0.3, (fvu, wrong)
