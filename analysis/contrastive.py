"""Contrastive interpretability score (the CE-Bench idea, no LLM judge).

Each pair holds two short stories that differ in one concept; the first one carries it.
With V1, V2 the mean SAE codes over each story's tokens and M the mean of V over all stories:
    contrastive  = max over latents of zscore(|V1 - V2|)
    independence = max over latents of zscore(|V1 - M|)
where zscore standardises across latents. An interpretable dictionary has one latent that
stands out for the concept; the combined score is (contrastive + independence) / 2, averaged
over pairs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

import activations

from .datasets import load_contrastive_pairs
from .pooling import pooled


def _zscore(v: Tensor) -> Tensor:
    std = v.std()
    return torch.zeros_like(v) if std == 0 else (v - v.mean()) / std


def contrastive_scores(v1: Tensor, v2: Tensor) -> dict:
    """Scores from mean codes of the concept stories v1 [P, n] and their contrasts v2 [P, n]."""
    if v1.shape != v2.shape or v1.ndim != 2:
        raise ValueError(f"v1 and v2 must both be [pairs, n_latents]; got {tuple(v1.shape)} and {tuple(v2.shape)}")
    v1, v2 = v1.double(), v2.double()
    dataset_mean = torch.cat([v1, v2]).mean(0)
    contrast = torch.stack([_zscore(d) for d in (v1 - v2).abs()])
    independ = torch.stack([_zscore(d) for d in (v1 - dataset_mean).abs()])
    c, i = contrast.max(1).values, independ.max(1).values
    return {
        "contrastive_score": float(c.mean()),
        "independence_score": float(i.mean()),
        "interpretability_score": float(((c + i) / 2).mean()),
        "top_contrastive_latents": contrast.argmax(1).tolist(),
    }


def contrastive_eval(
    model: torch.nn.Module, lm: activations.LanguageModel, site: str, batch_size: int = 16
) -> dict:
    """Contrastive scores of `model` on the shipped story pairs."""
    pairs = load_contrastive_pairs()
    v1 = pooled(model, lm, site, [p["with_concept"] for p in pairs], batch_size)[1]
    v2 = pooled(model, lm, site, [p["without_concept"] for p in pairs], batch_size)[1]
    scores = contrastive_scores(v1, v2)
    # Which latent lights up for which concept (its most common top latent), readable in the report.
    votes: dict[str, Counter] = {}
    for pair, latent in zip(pairs, scores["top_contrastive_latents"], strict=True):
        votes.setdefault(pair["concept"], Counter())[latent] += 1
    scores["top_latent_by_concept"] = {c: v.most_common(1)[0][0] for c, v in votes.items()}
    return scores
