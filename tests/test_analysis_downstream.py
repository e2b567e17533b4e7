"""Splicing SAEs into a tiny model: known CE / KL scores, the error-term splice, `evaluate`."""

from __future__ import annotations

import math

import pytest
import torch

import activations
import analysis
import sae

SITE = "blocks.1.hook_resid_post"


def identity_sae(d: int) -> sae.BaseSAE:
    """TopK SAE with W_enc = W_dec = [I; -I]: relu(x) - relu(-x) = x, so it reconstructs exactly."""
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=d, n_latents=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        model.W_enc.copy_(torch.cat([eye, -eye]))
        model.W_dec.copy_(torch.cat([eye, -eye]))
        model.b_enc.zero_()
        model.b_dec.zero_()
    return model


def zero_sae(d: int) -> sae.BaseSAE:
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=d, n_latents=2 * d, k=4))
    with torch.no_grad():
        model.W_dec.zero_()
        model.b_dec.zero_()
    return model


def _scores(model, lm, windows):
    keep = activations.token_mask(lm, windows)
    return analysis.downstream_scores(analysis.downstream_sums(model, lm, SITE, windows, keep))


def test_identity_sae_scores_one_and_zero_sae_scores_zero(tiny_lm, tiny_windows):
    windows = tiny_windows[:4]
    ident = _scores(identity_sae(tiny_lm.d_model), tiny_lm, windows)
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert ident["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert ident["delta_ce"] == pytest.approx(0.0, abs=1e-4) and ident["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    zero = _scores(zero_sae(tiny_lm.d_model), tiny_lm, windows)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6) and zero["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_zero"] != pytest.approx(zero["ce_clean"])  # ablating the site does change the model
    # A random SAE lands in between and the score agrees with its definition.
    torch.manual_seed(0)
    rand = _scores(sae.create(sae.SAEConfig(architecture="topk", d_in=64, n_latents=128, k=8)), tiny_lm, windows)
    expected = (rand["ce_zero"] - rand["ce_sae"]) / (rand["ce_zero"] - rand["ce_clean"])
    assert rand["ce_loss_score"] == pytest.approx(expected) and math.isfinite(expected)


def test_keeping_the_error_term_reproduces_clean_logits_and_passes_gradients(tiny_lm, tiny_windows):
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=tiny_lm.d_model, n_latents=128, k=8))
    ids = tiny_windows[:2]
    clean = activations.logits(tiny_lm, ids)
    with activations.patch_site(tiny_lm, SITE, analysis.sae_splice(model, keep_error=True)):
        kept = tiny_lm.model(input_ids=ids, use_cache=False).logits
    with activations.patch_site(tiny_lm, SITE, analysis.sae_splice(model)):
        spliced = activations.logits(tiny_lm, ids)
    assert torch.allclose(kept, clean, atol=1e-5)
    assert not torch.allclose(spliced, clean, atol=1e-3)  # a random SAE alone is far from exact
    kept.logsumexp(-1).sum().backward()  # the forward value is clean, yet the SAE gets gradients
    assert model.W_dec.grad is not None and model.W_dec.grad.abs().sum() > 0


def test_splice_respects_the_mask():
    model = zero_sae(4)
    a = torch.randn(2, 3, 4)
    mask = torch.tensor([[False, True, True], [True, False, True]])
    out = analysis.sae_splice(model, mask)(a)
    assert torch.equal(out[~mask], a[~mask]) and torch.equal(out[mask], torch.zeros_like(a[mask]))
    assert torch.equal(analysis.zero_splice(mask)(a), out)


def test_evaluate_identity_sae_end_to_end(tiny_lm, tmp_path):
    texts = activations.default_texts(limit=60)
    report = analysis.evaluate(
        identity_sae(tiny_lm.d_model), tiny_lm, SITE, texts=texts, n_tokens=256, context_len=32, absorption=False,
        split="all",  # explicit eval texts, every document
    )
    assert report["fvu"] == pytest.approx(0.0, abs=1e-9) and report["explained_variance"] == pytest.approx(1.0)
    assert report["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert report["cosine"] == pytest.approx(1.0) and report["l2_ratio"] == pytest.approx(1.0)
    assert report["n_tokens"] == 8 * 31  # 8 windows of 32, BOS dropped
    assert report["l0"] == pytest.approx(tiny_lm.d_model, abs=1)  # one of each +/- pair fires per dimension
    assert len(report["latent_density"]) == 2 * tiny_lm.d_model
    assert report["max_decoder_cosine_mean"] == pytest.approx(0.0, abs=1e-6)  # rows are +/- unit vectors
    assert 0.0 <= report["probing"]["sae_top1_accuracy"] <= 1.0
    assert math.isfinite(report["contrastive"]["interpretability_score"])
    analysis.save_report(report, tmp_path / "r.json")
    assert len(analysis.write_plots(report, tmp_path)) == 2
    assert "| a |" in analysis.compare_table({"a": report})
    with pytest.raises(ValueError, match="valid"):
        analysis.evaluate(identity_sae(tiny_lm.d_model), tiny_lm, SITE, n_tokenz=5)
    with pytest.raises(ValueError, match="d_model"):
        analysis.evaluate(identity_sae(8), tiny_lm, SITE)


@pytest.mark.parametrize("architecture", sae.architectures())
def test_every_architecture_evaluates(architecture, tiny_lm):
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture=architecture, d_in=tiny_lm.d_model, n_latents=96, k=8))
    if model.predicts_target:  # a transcoder of layer 1's MLP
        model.metadata = {"target_site": "blocks.1.hook_mlp_out"}
    report = analysis.evaluate(
        model, tiny_lm, "blocks.1.mlp.hook_in" if model.predicts_target else SITE, texts=activations.default_texts(limit=20), n_tokens=64, context_len=32,
        absorption=False, probing=False, contrastive=False, split="all",
    )
    assert report["n_tokens"] == 2 * 31 and len(report["latent_density"]) == 96
    assert all(math.isfinite(report[k]) for k in ("fvu", "l0", "ce_loss_score", "kl_score", "cosine"))
