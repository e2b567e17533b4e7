"""top-AFA SAE (Lee et al., "Evaluating and designing sparse autoencoders by approximating
quasi-orthogonality"): no fixed k. With quasi-orthogonal decoder rows, ‖x − b_dec‖² ≈ Σ (z_i‖d_i‖)²,
so each token keeps its strongest codes until their energy best matches its own norm; an AFA loss
pulls the two norms together."""
from __future__ import annotations

import torch
from torch import Tensor

import kernels
from sae.base import SAEOutput
from sae.distributed import batch_mean
from sae.registry import register
from sae.topk_family import TopKFamilySAE

DEFAULT_AFA_COEFF = 1.0
"""Weight of the AFA loss (‖z‖ − ‖x − b_dec‖)² / mean ‖x − b_dec‖² when sparsity_coeff is None
(at 0.1 the codes stay too small to match the norm and every token uses the cap, measured)."""


@register("topafa")
class TopAFASAE(TopKFamilySAE):
    """Per-token L0 set by norm matching, capped at k (the compute bound of the candidate top-k)."""

    @torch.no_grad()
    def norm_matched(self, x_centered: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        """Mask [N, K] keeping, of the ranked candidates, the prefix whose decoded energy
        sqrt(Σ (z_i‖d_i‖)²) is closest to ‖x − b_dec‖ (at least one latent)."""
        energy = (vals * self.W_dec.norm(dim=-1)[idx]).pow(2).cumsum(dim=-1).sqrt()
        target = x_centered.norm(dim=-1, keepdim=True)
        keep = (energy - target).abs().argmin(dim=-1, keepdim=True) + 1
        return torch.arange(vals.shape[-1], device=vals.device) < keep

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The kept codes as (values, latent indices) [N, k]; entries past a token's L0 are 0."""
        x_centered = self.centered(x)
        vals, idx = kernels.topk_encode(x_centered, self.W_enc, self.b_enc, self.cfg.k, backend=self.cfg.kernel_backend)
        return vals * self.norm_matched(x_centered, vals, idx), idx

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        x_centered = self.centered(x)
        (vals, idx), aux = self.topk_with_aux(x_centered, self.cfg.k, dead_mask)
        vals = vals * self.norm_matched(x_centered, vals, idx)
        out = self.sparse_output(x, vals, idx, aux)
        code_norm = (vals * self.W_dec.norm(dim=-1)[idx]).norm(dim=-1)
        target = x_centered.detach().norm(dim=-1)
        out.parts["afa"] = batch_mean((code_norm - target).pow(2)) / batch_mean(target.pow(2)).clamp_min(1e-8)
        coeff = DEFAULT_AFA_COEFF if self.cfg.sparsity_coeff is None else self.cfg.sparsity_coeff
        out.loss = out.loss + coeff * out.parts["afa"]
        return out
