"""The whole eval on the embedded SmolLM2 with a crafted PCA SAE whose FVU is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import activations
import analysis
import sae

SITE = "blocks.3.hook_resid_post"
RANK = 48


def _pca_sae(lm, texts: list[str]) -> tuple[sae.BaseSAE, np.ndarray, np.ndarray]:
    """TopK SAE with W_enc = W_dec = [U; -U] for the top-RANK principal directions U and b_dec = mean:
    x_hat = mean + U U^T (x - mean) exactly (one of each +/- pair fires per direction)."""
    ids = activations.token_windows(lm.tokenizer, texts, 128)[:8]
    x = activations.harvest(lm, ids, SITE)[SITE][activations.token_mask(lm, ids)].double().numpy()
    mean = x.mean(0)
    u = np.linalg.svd(x - mean, full_matrices=False)[2][:RANK]
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=lm.d_model, n_latents=2 * RANK, k=RANK))
    w = torch.tensor(np.concatenate([u, -u]), dtype=torch.float32)
    with torch.no_grad():
        model.W_enc.copy_(w)
        model.W_dec.copy_(w)
        model.b_enc.zero_()
        model.b_dec.copy_(torch.tensor(mean, dtype=torch.float32))
    return model, mean, u


@pytest.mark.real_model
def test_evaluate_on_default_model(default_lm):
    texts = activations.default_texts()
    model, mean, u = _pca_sae(default_lm, texts[:300])
    eval_texts = texts[-200:]
    report = analysis.evaluate(
        model, default_lm, SITE, texts=eval_texts, n_tokens=256, context_len=128,
        absorption_cfg=analysis.AbsorptionConfig(max_words=400),
    )
    # Closed-form reference on the same tokens the eval used.
    ids = activations.token_windows(default_lm.tokenizer, eval_texts, 128)[:2]
    x = activations.harvest(default_lm, ids, SITE)[SITE][activations.token_mask(default_lm, ids)].double().numpy()
    x_hat = mean + (x - mean) @ u.T @ u
    ref_fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert report["n_tokens"] == len(x)
    assert report["fvu"] == pytest.approx(ref_fvu, rel=1e-3)
    assert report["l0"] == pytest.approx(RANK, abs=0.5)
    assert 0 < report["fvu"] < 1 and report["explained_variance"] == pytest.approx(1 - report["fvu"])
    assert 0 < report["ce_loss_score"] <= 1.05 and 0 < report["kl_score"] <= 1.0
    assert report["ce_clean"] < report["ce_sae"] < report["ce_zero"]
    assert 0 < report["cosine"] <= 1 and 0 < report["relative_reconstruction_bias"] < 2
    flat = [v for v in report.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in flat)
    ab, pr, co = report["absorption"], report["probing"], report["contrastive"]
    assert 0 <= ab["mean_absorption_fraction"] <= 1 and 0 <= ab["full_absorption_rate"] <= 1
    assert ab["probe_test_accuracy"] > 1 / 26  # the letter is linearly readable from the residual
    for key in ("dense_accuracy", "sae_top1_accuracy", "sae_top2_accuracy", "sae_top5_accuracy"):
        assert 0.4 <= pr[key] <= 1.0
    assert pr["dense_accuracy"] > 0.8  # templated datasets are easy for a dense probe
    assert math.isfinite(co["interpretability_score"]) and co["interpretability_score"] > 0
    print(analysis.compare_table({"pca48": report}), report["meta"]["seconds"])
