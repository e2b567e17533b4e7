"""AdaptiveK SAE (Yao et al., "Adaptive-K sparse autoencoders"): a linear probe estimates each
input's complexity and sets its number of active latents; the batch's mean is held at k."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import kernels
from sae.base import SAEOutput
from sae.distributed import batch_mean
from sae.config import SAEConfig
from sae.registry import register
from sae.topk_family import TopKFamilySAE

K_MAX_FACTOR = 4
"""A token may use up to this many times the mean budget k (the candidate top-k's width)."""
GATE_TEMPERATURE = 0.5
"""Softness, in ranks, of the gate through which the reconstruction loss trains the probe."""
MOMENTUM = 0.99


@register("adaptivek")
class AdaptiveKSAE(TopKFamilySAE):
    """k_i = k · c_i / mean(c), c_i = softplus(probe(x_i − b_dec)): the mean over a training batch
    is exactly k, at inference the running mean of c replaces the batch's. Token i keeps its
    round(k_i) strongest codes; a straight-through sigmoid gate over the ranks carries the
    reconstruction gradient to the probe."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.complexity_w = nn.Parameter(torch.zeros(cfg.d_in))
        self.complexity_b = nn.Parameter(torch.zeros(()))
        self.register_buffer("complexity_mean", nn.functional.softplus(torch.zeros(())))

    @property
    def k_max(self) -> int:
        return min(self.cfg.n_latents, K_MAX_FACTOR * self.cfg.k)

    def complexity(self, x_centered: Tensor) -> Tensor:
        """The probe's positive complexity estimate per token [N]."""
        return nn.functional.softplus(x_centered @ self.complexity_w + self.complexity_b)

    def budgets(self, x_centered: Tensor) -> Tensor:
        """Each token's (real-valued) number of latents k_i [N]."""
        c = self.complexity(x_centered)
        mean = c.mean() if self.training else self.complexity_mean
        return self.cfg.k * c / mean.clamp_min(1e-8)

    def gate(self, k_i: Tensor) -> Tensor:
        """[N, k_max]: 1 for the round(k_i) first ranks (at least one), 0 after; its gradient in
        k_i is the soft sigmoid's."""
        ranks = torch.arange(self.k_max, device=k_i.device, dtype=k_i.dtype)
        hard = ranks < k_i.detach().round().clamp(1, self.k_max)[:, None]
        soft = torch.sigmoid((k_i[:, None] - ranks - 0.5) / GATE_TEMPERATURE)
        return hard + (soft - soft.detach())

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The kept codes as (values, latent indices) [N, k_max]; entries past k_i are 0."""
        x_centered = self.centered(x)
        vals, idx = kernels.topk_encode(x_centered, self.W_enc, self.b_enc, self.k_max, backend=self.cfg.kernel_backend)
        return vals * self.gate(self.budgets(x_centered)), idx

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        x_centered = self.centered(x)
        main, aux = self.topk_with_aux(x_centered, self.k_max, dead_mask)
        c = self.complexity(x_centered)
        c_mean = batch_mean(c)
        with torch.no_grad():
            self.complexity_mean.mul_(MOMENTUM).add_((1 - MOMENTUM) * c_mean)
        k_i = self.cfg.k * c / c_mean.clamp_min(1e-8)
        return self.sparse_output(x, main.values * self.gate(k_i), main.indices, aux)

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, Tensor]:
        state = super().folded_state_dict()
        # The probe reads x·scale − b_dec; folded, it reads x − b_dec/scale.
        state["complexity_w"] *= self.input_scale
        return state
