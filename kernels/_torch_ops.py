"""Torch fast path: the three sparse primitives, built on ``embedding_bag``.

Shapes used throughout: ``idx``/``vals`` are ``[N, K]`` (row ``i`` of the batch uses latents
``idx[i, :]`` with weights ``vals[i, :]``), ``rows`` is an ``[n, d]`` matrix whose row ``l``
belongs to latent ``l``, and ``X`` is ``[N, d]``. Nothing here materialises an ``[N, n]``
tensor, and nothing materialises an ``[N, K, d]`` one either.

Measured on 2 CPU threads (N=4096, d=576, n=9216, K=32): ``gather_mm`` ~17 ms,
``gather_dot`` ~29 ms, ``segment_mm`` ~6-12 ms; a dense ``[N, n] @ [n, d]`` is ~330 ms.
``segment_sum`` uses ``index_add_``, deterministic on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_mm(idx: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = sum_j vals[i, j] * rows[idx[i, j]] (+ bias)`` -> ``[N, d]``."""
    rows = rows.contiguous()
    out = F.embedding_bag(idx, rows, per_sample_weights=vals.to(rows.dtype), mode="sum")
    if bias is not None:
        out.add_(bias)
    return out


def gather_dot(idx: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = <grad[i], rows[idx[i, j]]>`` -> ``[N, K]`` (in ``rows``' dtype)."""
    n_rows, k = idx.shape
    flat = idx.reshape(-1)
    rows = rows.contiguous()
    grad = grad.to(rows.dtype).contiguous()
    try:
        # The op autograd itself uses for embedding_bag's per_sample_weights: one fused,
        # threaded pass, ~2x faster than the best chunked gather+multiply below.
        offsets = torch.arange(0, n_rows * k, k, device=idx.device, dtype=flat.dtype)
        offset2bag = torch.arange(n_rows, device=idx.device, dtype=flat.dtype).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, rows, flat, offsets, offset2bag, 0, -1)
        return out.view(n_rows, k)
    except (AttributeError, RuntimeError, NotImplementedError):  # private op: keep a fallback
        return _gather_dot_chunked(idx, grad, rows)


def _gather_dot_chunked(idx: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor,
                        max_elems: int = 1 << 21) -> torch.Tensor:
    n_rows, k = idx.shape
    out = torch.empty(n_rows, k, dtype=rows.dtype, device=rows.device)
    step = max(1, max_elems // max(1, k * rows.shape[1]))
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        torch.sum(F.embedding(idx[s:e], rows) * grad[s:e, None, :], dim=-1, out=out[s:e])
    return out


def segment_mm(idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Transposed sparse product ``out[l] = sum_{(i,j): idx[i,j]=l} vals[i,j] * x[i]`` -> ``[n, d]``.

    Sorts the ``N*K`` entries by latent, so that each latent's entries form one bag of an
    ``embedding_bag`` over the rows of ``x``; latents that no row uses get zeros.
    """
    order, starts = sort_by_latent(idx, n)
    k = idx.shape[1]
    batch_rows = torch.div(order, k, rounding_mode="floor")
    x = x.contiguous()
    weights = vals.reshape(-1)[order].to(x.dtype)
    return F.embedding_bag(batch_rows, x, starts[:-1], per_sample_weights=weights, mode="sum")


def segment_sum(idx: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """``out[l] = sum_{(i,j): idx[i,j]=l} vals[i,j]`` -> ``[n]``."""
    out = torch.zeros(n, dtype=vals.dtype, device=vals.device)
    return out.index_add_(0, idx.reshape(-1), vals.reshape(-1))


def sort_by_latent(idx: torch.Tensor, n: int):
    """CSR view of the transposed sparsity pattern.

    Returns ``(order, starts)``: ``order`` permutes the flattened ``[N*K]``
    entries so that latent ids ascend (stable, so deterministic), and latent ``l``'s entries
    are ``order[starts[l]:starts[l+1]]`` (``starts`` has ``n + 1`` entries).
    """
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n)
    starts = torch.zeros(n + 1, dtype=order.dtype, device=idx.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return order, starts
