"""BatchTopK SAE (Bussmann et al.): keep the top k·B activations over a whole batch while training;
at inference a learned global threshold replaces the batch dependence."""
from __future__ import annotations

import torch
from torch import Tensor

import kernels
from sae.base import SAEOutput
from sae.config import SAEConfig
from sae.registry import register
from sae.topk_family import TopKFamilySAE

THRESHOLD_MOMENTUM = 0.99


@register("batchtopk")
class BatchTopKSAE(TopKFamilySAE):
    """k active latents per token on average; per-token sparsity adapts to the token."""

    data_parallel = False  # the batch-level top k·B would need every rank's pre-activations

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # Running mean of the smallest kept activation: the inference-time threshold.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Codes as (values, indices) [N, K], rows zero-padded: the batch-level top k·B while
        training (or before a threshold exists), every pre-activation above the learned
        threshold otherwise (so a token's codes do not depend on the rest of its batch)."""
        if self.training or self.threshold < 0:
            return self.batch_topk(x)
        return tuple(
            kernels.threshold_encode(self.centered(x), self.W_enc, self.b_enc, self.threshold, backend=self.cfg.kernel_backend)
        )

    def batch_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(
            kernels.batch_topk_encode(self.centered(x), self.W_enc, self.b_enc, self.cfg.k, backend=self.cfg.kernel_backend)
        )

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        vals, idx = self.batch_topk(x)
        self._update_threshold(vals)
        aux = self.aux_codes(x, dead_mask) if dead_mask is not None and dead_mask.any() else None
        return self.sparse_output(x, vals, idx, aux)

    @torch.no_grad()
    def _update_threshold(self, vals: Tensor) -> None:
        kept = vals[vals > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(THRESHOLD_MOMENTUM).add_((1 - THRESHOLD_MOMENTUM) * smallest)
