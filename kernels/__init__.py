"""Fused sparse encode/decode for TopK-family sparse autoencoders.

Each op is one autograd Function with three backends:

- ``"triton"``: Triton kernels, for CUDA tensors (the ``"auto"`` choice there when triton
  is installed);
- ``"torch"``: a fast path on ``embedding_bag``-style sparse ops (``"auto"`` elsewhere; also
  runs on CUDA);
- ``"reference"``: plain dense torch + autograd, the ground truth for tests.

The fused backends never densify the latents in backward: gradients cost ``O(N*k*d)``
instead of ``O(N*n_latents*d)``, and no ``[N, n_latents]`` tensor is kept for autograd.

Conventions: ``W_enc`` and ``W_dec`` are ``[n_latents, d_in]`` (latent rows, like
``nn.Linear.weight`` for the encoder); ``pre = x @ W_enc.T + b_enc``. Any strides work.
Leading batch dimensions are allowed. Indices are int64 (int32 accepted by the decoder).

>>> vals, idx = topk_encode(x - b_dec, W_enc, b_enc, k=32)
>>> x_hat = sparse_decode(vals, idx, W_dec, b_dec)

On CPU the trainer bypasses these Functions for plain TopK SAEs: ``kernels.native`` holds
native kernels for a fused training step (selection, decode, loss, all gradients, Adam),
built from ``native.cpp`` on first use.

``import kernels`` imports only torch (triton only when its backend is used). PyPI has an
unrelated package also imported as ``kernels`` (Hugging Face's); transformers looks for it
by reading ``kernels.__version__``, so this package deliberately defines none.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

from . import _autograd, _torch_ops, reference

__all__ = [
    "SparseCodes", "topk_encode", "batch_topk_encode", "threshold_encode", "topk_encode_with_aux", "sparse_decode",
    "to_dense", "resolve_backend", "available_backends", "BACKENDS",
]

BACKENDS = ("triton", "torch", "reference")


class SparseCodes(NamedTuple):
    """``K`` latents per row: ``values[..., j]`` of latent ``indices[..., j]``."""

    values: torch.Tensor
    indices: torch.Tensor


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CUDA if present, else CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    triton_ok = _triton_installed() and (device.type == "cuda" or _triton_interpreting())
    return (["triton"] if triton_ok else []) + ["torch", "reference"]


def resolve_backend(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """``"auto"``/``None`` -> ``"triton"`` for CUDA tensors with triton installed, else ``"torch"``."""
    if backend in (None, "auto"):
        on_cuda = any(t is not None and t.is_cuda for t in tensors)
        return "triton" if on_cuda and _triton_installed() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    if backend == "triton" and not _triton_installed():
        raise RuntimeError("backend='triton' needs the triton package: pip install 'sae-toolkit[triton]'")
    return backend


def _ops(backend: str):
    if backend == "triton":
        from . import _triton_ops  # imports triton: only when asked for

        return _triton_ops
    return _torch_ops


def _check_encoder(x, w_enc, b_enc, k) -> int:
    if w_enc.dim() != 2:
        raise ValueError(f"W_enc must be [n_latents, d_in], got shape {tuple(w_enc.shape)}")
    n, d_in = w_enc.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dim {x.shape[-1]} but W_enc is [n_latents={n}, d_in={d_in}]")
    if b_enc is not None and tuple(b_enc.shape) != (n,):
        raise ValueError(f"b_enc must have shape ({n},), got {tuple(b_enc.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n_latents={n}], got {k}")
    return n


def _encode(x, w_enc, b_enc, mode, k, aux_k, dead_mask, backend):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    name = resolve_backend(backend, x, w_enc)
    if name == "reference":
        out = reference.encode(x2, w_enc, b_enc, mode, k, aux_k, dead_mask)
    else:
        out = _autograd.SparseEncode.apply(x2, w_enc, b_enc, mode, k, aux_k, dead_mask, _ops(name))
    vals, idx, aux_vals, aux_idx = out
    return (SparseCodes(vals.reshape(*lead, -1), idx.reshape(*lead, -1)),
            SparseCodes(aux_vals.reshape(*lead, -1), aux_idx.reshape(*lead, -1)))


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, k: int,
                signed: bool = False, backend: str | None = "auto") -> SparseCodes:
    """Per-row TopK codes ``(vals, idx)``, each ``[..., k]``, ranked (strongest first), with a
    sparse backward.

    ``signed=False``: top ``k`` of ``relu(x @ W_enc.T + b_enc)``; values are >= 0, and a
    selected latent whose pre-activation is <= 0 has value 0 and gets no gradient.
    ``signed=True`` (AbsTopK): top ``k`` by ``|pre|``; values are ``pre`` (sign kept).
    Differentiable w.r.t. ``x``, ``W_enc`` and ``b_enc``.
    """
    _check_encoder(x, W_enc, b_enc, k)
    return _encode(x, W_enc, b_enc, "abstopk" if signed else "topk", k, 0, None, backend)[0]


def batch_topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, k: int,
                      backend: str | None = "auto") -> SparseCodes:
    """BatchTopK: the top ``N*k`` of ``relu(pre)`` over the whole batch of ``N`` rows.

    Rows choose different numbers of latents; results are ``[..., K]`` with ``K`` the
    largest count in any row, rows padded with value 0 (index 0). ``x`` must be 2-D
    (the batch is what the selection is over).
    """
    if x.dim() != 2:
        raise ValueError(f"batch_topk_encode needs x of shape [N, d_in], got {tuple(x.shape)}")
    _check_encoder(x, W_enc, b_enc, k)
    return _encode(x, W_enc, b_enc, "batchtopk", k, 0, None, backend)[0]


def threshold_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
                     threshold: float | torch.Tensor, backend: str | None = "auto") -> SparseCodes:
    """Every pre-activation above ``threshold`` (a float, or a ``[n_latents]`` tensor of
    per-latent thresholds) and above 0, as ``[..., K]`` codes with ``K`` the largest count in
    any row, rows padded with value 0 (index 0); latents ascend within a row. The sparse form
    of ``relu(pre) * (pre > threshold)`` (BatchTopK at inference, JumpReLU), with a sparse backward.
    """
    n = _check_encoder(x, W_enc, b_enc, 1)
    if isinstance(threshold, torch.Tensor) and threshold.numel() not in (1, n):
        raise ValueError(f"threshold must be a float or have n_latents={n} entries, got shape {tuple(threshold.shape)}")
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach().to(torch.result_type(x, W_enc)).reshape(-1)
    return _encode(x, W_enc, b_enc, "threshold", threshold, 0, None, backend)[0]


def topk_encode_with_aux(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
                         k: int, aux_k: int, dead_mask: torch.Tensor,
                         backend: str | None = "auto") -> tuple[SparseCodes, SparseCodes]:
    """``topk_encode`` plus the AuxK selection, both from one GEMM.

    The second result is the top ``aux_k`` ReLU'd pre-activations among latents where
    ``dead_mask`` (bool ``[n_latents]``) is True: what an AuxK loss decodes, without a second
    ``x @ W_enc.T``. Its width is ``aux_k`` clamped to the number of dead latents (so no
    padding is decoded and differentiated); entries whose pre-activation is <= 0 have value
    0 and no gradient.
    """
    n = _check_encoder(x, W_enc, b_enc, k)
    if dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (n,):
        raise ValueError(f"dead_mask must be a bool tensor of shape ({n},), "
                         f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
    if aux_k < 0:
        raise ValueError(f"aux_k must be >= 0, got {aux_k}")
    return _encode(x, W_enc, b_enc, "topk", k, min(aux_k, int(dead_mask.sum())), dead_mask, backend)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None, backend: str | None = "auto") -> torch.Tensor:
    """``sum_j vals[..., j] * W_dec[idx[..., j]] + b_dec`` -> ``[..., d_in]``.

    Never densifies the codes. Repeated indices in a row add up, so padding with value 0
    is harmless. Differentiable w.r.t. ``vals``, ``W_dec`` and ``b_dec``.
    """
    if idx.shape != vals.shape:
        raise ValueError(f"vals {tuple(vals.shape)} and idx {tuple(idx.shape)} differ in shape")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be int64 or int32, got {idx.dtype} (did you swap vals and idx?)")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [n_latents, d_in], got shape {tuple(W_dec.shape)}")
    n, d = W_dec.shape
    if b_dec is not None and tuple(b_dec.shape) != (d,):
        raise ValueError(f"b_dec must have shape ({d},), got {tuple(b_dec.shape)}")
    lead, k = idx.shape[:-1], idx.shape[-1]
    idx2, vals2 = idx.reshape(-1, k), vals.reshape(-1, k)
    name = resolve_backend(backend, vals, W_dec)
    if name == "reference":
        out = reference.sparse_decode(vals2, idx2, W_dec, b_dec)
    else:
        out = _autograd.SparseDecode.apply(vals2, idx2, W_dec, b_dec, _ops(name))
    return out.reshape(*lead, d)


def to_dense(codes: SparseCodes | tuple[torch.Tensor, torch.Tensor], n_latents: int) -> torch.Tensor:
    """Dense ``[..., n_latents]`` codes from ``(vals, idx)``; repeated indices add up.

    Differentiable in the values.
    """
    vals, idx = codes
    return vals.new_zeros(*vals.shape[:-1], n_latents).scatter_add(-1, idx.long(), vals)
