"""Sparse probing and the contrastive score on planted features."""

from __future__ import annotations

import pytest
import torch

import analysis


def test_sparse_probe_finds_the_planted_latent_at_k1():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    codes = torch.relu(torch.randn(200, 50, generator=g))
    codes[:, 17] = 2.0 * labels + 0.1 * torch.rand(200, generator=g)  # the planted feature
    acts = torch.randn(200, 8, generator=g)
    acts[:, 3] += 6.0 * labels
    out = analysis.probe_task(acts, codes, labels)
    assert out["sae_top1_latents"] == [17]
    assert out["sae_top1_accuracy"] == pytest.approx(1.0)
    assert out["dense_accuracy"] > 0.95
    assert set(out) >= {"sae_top2_accuracy", "sae_top5_accuracy"} and 17 in out["sae_top5_latents"]
    # Without the planted latent, one noise latent is no better than chance.
    codes[:, 17] = torch.relu(torch.randn(200, generator=g))
    assert analysis.probe_task(acts, codes, labels)["sae_top1_accuracy"] < 0.75
    with pytest.raises(ValueError, match="binary"):
        analysis.probe_task(acts, codes, torch.zeros(200))


def test_contrastive_score_ranks_the_planted_concept_latent_first():
    g = torch.Generator().manual_seed(0)
    pairs, n = 20, 100
    v2 = torch.relu(torch.randn(pairs, n, generator=g)) * 0.3
    v1 = v2 + 0.1 * torch.randn(pairs, n, generator=g).abs()
    planted = v1.clone()
    planted[:, 42] += 3.0
    out = analysis.contrastive_scores(planted, v2)
    assert out["top_contrastive_latents"] == [42] * pairs
    base = analysis.contrastive_scores(v1, v2)
    assert out["interpretability_score"] > base["interpretability_score"] + 2
    # Reference for pair 0, written out: z-scores across latents, independence against the dataset mean.
    def z(v):
        return (v - v.mean()) / v.std()

    mean = torch.cat([planted, v2]).double().mean(0)
    c0 = z((planted[0] - v2[0]).double().abs()).max()
    i0 = z((planted[0].double() - mean).abs()).max()
    single = analysis.contrastive_scores(planted[:1], v2[:1])
    assert single["contrastive_score"] == pytest.approx(float(c0))
    assert out["independence_score"] == pytest.approx(
        float(torch.stack([z((planted[p].double() - mean).abs()).max() for p in range(pairs)]).mean())
    )
    assert float(i0) > 3
    with pytest.raises(ValueError, match="pairs"):
        analysis.contrastive_scores(planted, v2[:3])
