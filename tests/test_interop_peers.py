"""The peers' own loaders read what we write, we read what they write, and both encode alike.

Needs the optional peers (`pip install -e ".[interop]"`; sae-lens pins transformer-lens < 4, so
use an environment without the `dev`/`lens` extras). Skipped, with the reason, where missing.
"""
import importlib.util

import pytest
import torch

import sae
from sae.synthetic import SyntheticData

pytestmark = pytest.mark.peers

D, N, K = 16, 48, 4


def ours_trained(arch: str) -> sae.BaseSAE:
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture=arch, d_in=D, n_latents=N, k=K))
    batches = [b * 40.0 + 3.0 for b in SyntheticData(d=D, n_features=32).batches(30, 64)]
    sae.Trainer(model, sae.TrainConfig(lr=3e-3, warmup_steps=2, log_every=10**9)).fit(batches, progress=False)
    return model.eval()


def inputs() -> torch.Tensor:
    return SyntheticData(d=D, n_features=32, seed=1).sample(300) * 40.0 + 3.0


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- SAELens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_saelens_reads_what_we_write(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (optional extra `interop`)")
    model = ours_trained(arch)
    model.save(tmp_path / "lens", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "lens"))
    x = inputs()
    with torch.no_grad():
        close(theirs.encode(x), model.encode(x))
        close(theirs(x), model(x))


def saelens_written(kind: str, folder):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (optional extra `interop`)")
    if kind == "topk_rescaled":
        theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True))
    elif kind == "standard_no_b_dec_in":
        theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False))
    elif kind == "jumprelu":
        theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=N))
    else:
        theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K))
    randomize(theirs)
    if kind == "jumprelu":
        theirs.threshold.data = theirs.threshold.data.abs()
    if kind.startswith("batchtopk"):
        theirs.topk_threshold.fill_(0.4)
        # The training checkpoint (architecture batchtopk) or the inference one (JumpReLU).
        (theirs.save_model if kind == "batchtopk_training" else theirs.save_inference_model)(str(folder))
        theirs = sae_lens.SAE.load_from_disk(str(folder)) if kind == "batchtopk_inference" else None
    else:
        theirs.save_model(str(folder))
    return theirs


@pytest.mark.parametrize("kind", ["topk_rescaled", "standard_no_b_dec_in", "jumprelu", "batchtopk_inference"])
def test_we_read_what_saelens_writes(tmp_path, kind):
    theirs = saelens_written(kind, tmp_path / "lens")
    ours = sae.load(tmp_path / "lens").eval()
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(ours.encode(x), theirs.encode(x))
        close(ours(x), theirs(x))


def test_we_read_saelens_batchtopk_training_checkpoints(tmp_path):
    saelens_written("batchtopk_training", tmp_path / "train")
    theirs = saelens_written("batchtopk_inference", tmp_path / "inference")
    ours = sae.load(tmp_path / "train").eval()
    assert isinstance(ours, sae.BatchTopKSAE) and ours.threshold.item() == pytest.approx(0.4)
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(ours.encode(x), theirs.encode(x))


# -- sparsify ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def sparsify_eager_decoder(monkeypatch):
    """sparsify decodes with a Triton kernel whenever triton is importable, which fails on CPU
    ("0 active drivers"); its own eager embedding_bag decoder computes the same thing."""
    if importlib.util.find_spec("sparsify") is not None:
        import sparsify.sparse_coder
        import sparsify.utils

        monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)


def dense(acts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(acts.shape[0], N).scatter(-1, indices, acts)


def test_sparsify_reads_what_we_write(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (optional extra `interop`)")
    model = ours_trained("topk")
    model.save(tmp_path / "layers.3", format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3")
    x = inputs()
    with torch.no_grad():
        out = theirs.encode(x)
        close(dense(out.top_acts, out.top_indices), model.encode(x))
        close(theirs.decode(out.top_acts, out.top_indices), model(x))
        close(theirs(x).sae_out, model(x))


def test_we_read_what_sparsify_writes(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (optional extra `interop`)")
    theirs = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K))
    randomize(theirs)
    theirs.save_to_disk(tmp_path / "layers.7")
    ours = sae.load(tmp_path / "layers.7")
    assert isinstance(ours, sae.TopKSAE) and ours.metadata == {"site": "blocks.7.hook_resid_post"}
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = theirs.encode(x)
        close(ours.encode(x), dense(out.top_acts, out.top_indices))
        close(ours(x), theirs(x).sae_out)


def test_sparsify_skip_without_transcode_is_refused(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (optional extra `interop`)")
    theirs = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K, skip_connection=True))
    theirs.save_to_disk(tmp_path / "layers.1")
    with pytest.raises(ValueError, match="skip_connection checkpoints that are not transcoders are not supported"):
        sae.load(tmp_path / "layers.1")


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoders_both_ways(tmp_path, skip):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (optional extra `interop`)")
    theirs = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K, transcode=True, skip_connection=skip))
    randomize(theirs)
    theirs.save_to_disk(tmp_path / "layers.2.mlp")
    ours = sae.load(tmp_path / "layers.2.mlp")
    assert ours.predicts_target and ours.metadata == {"site": "blocks.2.mlp.hook_in", "target_site": "blocks.2.hook_mlp_out"}
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(ours(x), theirs(x).sae_out)
    ours.save(tmp_path / "again", format="sparsify")
    back = sparsify.SparseCoder.load_from_disk(tmp_path / "again")
    with torch.no_grad():
        close(back(x).sae_out, theirs(x).sae_out)
