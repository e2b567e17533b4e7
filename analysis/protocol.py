"""What `analysis` needs of an SAE: this small protocol, never an architecture's internals."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class SAELike(Protocol):
    """An SAE as the analysis modules see it (every `sae.BaseSAE` is one).

    `cfg` needs `d_in` and `n_latents`; `metadata` may record the `model` and `site`. A
    transcoder also records `target_site` (and has `predicts_target = True`): it encodes `site`'s
    activations, and `model(x)` is its prediction of `target_site`'s (decode alone leaves out a
    skip connection's part)."""

    cfg: Any

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [N, n_latents] of raw activations x [N, d_in]."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction [N, d_in] in raw units from codes [N, n_latents]."""
        ...

    def decoder_directions(self) -> Tensor:
        """Each latent's contribution to the reconstruction per unit of code, in raw units [n_latents, d_in]."""
        ...
