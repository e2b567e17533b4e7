"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders"): ReLU, keep the k largest."""
from __future__ import annotations

from torch import Tensor

import kernels
from sae.base import SAEOutput
from sae.registry import register
from sae.topk_family import TopKFamilySAE


@register("topk")
class TopKSAE(TopKFamilySAE):
    """Exactly k active latents per token; dead latents are revived by the AuxK loss."""

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The k kept codes as (values, latent indices), each [N, k]."""
        x_in, b_enc = self.encoder_input(x)
        return tuple(kernels.topk_encode(x_in, self.W_enc, b_enc, self.cfg.k, backend=self.cfg.kernel_backend))

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        if dead_mask is None or not dead_mask.any():
            return self.sparse_output(x, *self.encode_sparse(x))
        # One GEMM serves both the main top-k and the AuxK selection among dead latents.
        x_in, b_enc = self.encoder_input(x)
        main, aux = kernels.topk_encode_with_aux(
            x_in, self.W_enc, b_enc, self.cfg.k, self.cfg.effective_k_aux, dead_mask, backend=self.cfg.kernel_backend
        )
        return self.sparse_output(x, main.values, main.indices, aux)
