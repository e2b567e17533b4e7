"""The TopK family: SAEs whose codes are k-sparse (values, latent indices) per token.

They share sparse decoding (no [N, n_latents] tensor), the FVU loss, and AuxK (OpenAI): the
top-k_aux dead latents reconstruct the main model's error, which revives them.
"""
from __future__ import annotations

import torch
from torch import Tensor

import kernels
from sae.base import BaseSAE, SAEOutput, fvu


class TopKFamilySAE(BaseSAE):
    """Subclasses define `encode_sparse`; they may override `aux_codes` to share its GEMM."""

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The active codes as (values, latent indices), each [N, K]; padding entries have value 0."""
        raise NotImplementedError

    def encoder_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(input, bias) for the fused encoder, pre = input @ W_enc^T + bias: the values of
        (centered(x), b_enc).

        When x needs no gradient, the input is passed detached and b_dec's gradient through the
        encoder, -W_enc^T · Σ_rows dL/dpre, rides on the bias as `shift.detach() - shift`, an exact
        zero: the sparse backward then skips the input gradient (a gather of N·k encoder rows),
        whose row sum is all b_dec needs. Saves ~3% of a training step on CPU.
        """
        x_centered = self.centered(x)
        if x.requires_grad or not (torch.is_grad_enabled() and self.b_dec.requires_grad):
            return x_centered, self.b_enc
        shift = self.W_enc.detach() @ self.b_dec
        return x_centered.detach(), self.b_enc + (shift.detach() - shift)

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        x_hat = kernels.sparse_decode(vals, idx, self.W_dec, self.b_dec, backend=self.cfg.kernel_backend)
        return x_hat / self.output_scale

    def encode(self, x: Tensor) -> Tensor:
        return kernels.to_dense(self.encode_sparse(x), self.cfg.n_latents)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_sparse(*self.encode_sparse(x))

    def aux_codes(self, x: Tensor, dead_mask: Tensor) -> kernels.SparseCodes:
        """AuxK selection among the dead latents, from a GEMM over just their encoder rows."""
        dead = dead_mask.nonzero().flatten()
        k_aux = min(self.cfg.effective_k_aux, dead.numel())
        vals, local = kernels.topk_encode(
            self.centered(x), self.W_enc[dead], self.b_enc[dead], k_aux, backend=self.cfg.kernel_backend
        )
        return kernels.SparseCodes(vals, dead[local])

    def topk_with_aux(
        self, x_centered: Tensor, k: int, dead_mask: Tensor | None
    ) -> tuple[kernels.SparseCodes, kernels.SparseCodes | None]:
        """The ranked top-k ReLU codes and, if any latent is dead, the AuxK codes, from one GEMM."""
        backend = self.cfg.kernel_backend
        if dead_mask is None or not dead_mask.any():
            return kernels.topk_encode(x_centered, self.W_enc, self.b_enc, k, backend=backend), None
        return kernels.topk_encode_with_aux(
            x_centered, self.W_enc, self.b_enc, k, self.cfg.effective_k_aux, dead_mask, backend=backend
        )

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        vals, idx = self.encode_sparse(x)
        aux = self.aux_codes(x, dead_mask) if dead_mask is not None and dead_mask.any() else None
        return self.sparse_output(x, vals, idx, aux)

    def sparse_output(
        self, x: Tensor, vals: Tensor, idx: Tensor, aux: kernels.SparseCodes | None = None
    ) -> SAEOutput:
        """Loss = FVU of the reconstruction + aux_coeff · AuxK loss."""
        return self.scored_output(x, self.decode_sparse(vals, idx), vals, idx, aux)

    def scored_output(
        self, x: Tensor, x_hat: Tensor, vals: Tensor, idx: Tensor, aux: kernels.SparseCodes | None = None
    ) -> SAEOutput:
        """Loss = FVU of x_hat against x (a transcoder's x is its target) + aux_coeff · AuxK loss.

        The AuxK target is the main output's error, detached: no gradient flows back through it
        into the live latents.
        """
        parts = {"fvu": fvu(x, x_hat)}
        loss = parts["fvu"]
        if aux is not None:
            err_hat = kernels.sparse_decode(aux.values, aux.indices, self.W_dec, None, backend=self.cfg.kernel_backend)
            parts["auxk"] = fvu((x - x_hat).detach(), err_hat / self.output_scale)
            loss = loss + self.cfg.aux_coeff * parts["auxk"]
        active = vals != 0
        fired_idx = idx[active]
        return SAEOutput(
            loss=loss,
            x_hat=x_hat,
            parts=parts,
            fired=fired_idx.unique(),
            l0=active.sum(dim=-1).float().mean(),
            fire_counts=torch.bincount(fired_idx, minlength=self.cfg.n_latents),
        )
