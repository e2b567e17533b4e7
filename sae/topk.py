"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders"): ReLU, keep the k largest."""
from __future__ import annotations

import torch
from torch import Tensor

import kernels
from sae.base import BaseSAE, SAEOutput, fvu


class TopKSAE(BaseSAE):
    """Exactly k active latents per token; dead latents are revived by the AuxK loss."""

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The k kept codes as (values, latent indices), each [N, k]."""
        return tuple(
            kernels.topk_encode(self.centered(x), self.W_enc, self.b_enc, self.cfg.k, backend=self.cfg.kernel_backend)
        )

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        x_hat = kernels.sparse_decode(vals, idx, self.W_dec, self.b_dec, backend=self.cfg.kernel_backend)
        return x_hat / self.input_scale

    def encode(self, x: Tensor) -> Tensor:
        vals, idx = self.encode_sparse(x)
        return kernels.to_dense((vals, idx), self.cfg.n_latents)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_sparse(*self.encode_sparse(x))

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        if dead_mask is None or not dead_mask.any():
            return topk_family_output(self, x, *self.encode_sparse(x))
        # One GEMM serves both the main top-k and the AuxK selection among dead latents.
        main, aux = kernels.topk_encode_with_aux(
            self.centered(x), self.W_enc, self.b_enc, self.cfg.k, self.cfg.effective_k_aux, dead_mask,
            backend=self.cfg.kernel_backend,
        )
        return topk_family_output(self, x, main.values, main.indices, aux)


def topk_family_output(
    model: BaseSAE, x: Tensor, vals: Tensor, idx: Tensor, aux: kernels.SparseCodes | None = None
) -> SAEOutput:
    """Loss = FVU of the reconstruction + aux_coeff · AuxK loss.

    AuxK (OpenAI) reconstructs the main model's error from the top-k_aux dead latents; the error
    is a target only, so no gradient flows back through it into the live latents.
    """
    x_hat = model.decode_sparse(vals, idx)
    parts = {"fvu": fvu(x, x_hat)}
    loss = parts["fvu"]
    if aux is not None:
        err_hat = kernels.sparse_decode(aux.values, aux.indices, model.W_dec, None, backend=model.cfg.kernel_backend)
        parts["auxk"] = fvu((x - x_hat).detach(), err_hat / model.input_scale)
        loss = loss + model.cfg.aux_coeff * parts["auxk"]
    active = vals != 0
    fired_idx = idx[active]
    return SAEOutput(
        loss=loss,
        x_hat=x_hat,
        parts=parts,
        fired=fired_idx.unique(),
        l0=active.sum(dim=-1).float().mean(),
        fire_counts=torch.bincount(fired_idx, minlength=model.cfg.n_latents),
    )
