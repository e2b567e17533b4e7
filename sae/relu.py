"""The classic ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from sae.base import BaseSAE, SAEOutput, fvu
from sae.distributed import batch_mean
from sae.registry import register


@register("relu")
class ReLUSAE(BaseSAE):
    """Decoder rows are free in norm; the penalty Σ z·‖W_dec‖ stops the trivial rescaling."""

    unit_norm_decoder = False

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        z = self.encode(x)
        x_hat = self.decode(z)
        # Divided by the mean input norm so the coefficient does not depend on the data's scale.
        l1 = batch_mean((z * self.W_dec.norm(dim=-1)).sum(dim=-1)) / batch_mean(x.norm(dim=-1)).clamp_min(1e-8)
        parts = {"fvu": fvu(x, x_hat), "l1": l1}
        counts = (z > 0).sum(dim=0)
        return SAEOutput(
            loss=parts["fvu"] + self.cfg.effective_sparsity_coeff * l1,
            x_hat=x_hat,
            parts=parts,
            fired=counts.nonzero().flatten(),
            l0=(z > 0).sum(dim=-1).float().mean(),
            fire_counts=counts,
        )
