"""Triton path: the same three primitives as ``_torch_ops``, as tile-form Triton kernels.

Imported only when the Triton backend is asked for (``import kernels`` never imports
triton). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (what the
tests use; the interpreter needs numpy and is ~1000x slower, so keep shapes tiny there).

Triton fixes the choice between compiling and interpreting when ``triton.language`` is
first imported (its own ``tl.zeros``, ``tl.sum`` are jitted then): set ``TRITON_INTERPRET``
before anything imports triton (torch._dynamo does, and transformers imports that).

Accumulation is in fp32 (fp64 for fp64 tensors) whatever the storage dtype; offsets are
computed in int64.
``segment_mm`` works on the latent-sorted (CSR) form of the codes, one program per
(latent, d-tile), so it needs no atomics and is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _torch_ops

@triton.jit
def _gather_mm_kernel(idx_ptr, val_ptr, rows_ptr, bias_ptr, out_ptr,
                      N, K, D,
                      s_idx_n, s_idx_k, s_val_n, s_val_k, s_rows_l, s_rows_d, s_out_n, s_out_d,
                      HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[i, :] = sum_j val[i, j] * rows[idx[i, j], :] (+ bias); one (row-block, d-tile) per program
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rd = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mn = rn < N
    md = rd < D
    m2 = mn[:, None] & md[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for j in range(0, K):
        lat = tl.load(idx_ptr + rn * s_idx_n + j * s_idx_k, mask=mn, other=0).to(tl.int64)
        v = tl.load(val_ptr + rn * s_val_n + j * s_val_k, mask=mn, other=0.0).to(ACC)
        w = tl.load(rows_ptr + lat[:, None] * s_rows_l + rd[None, :] * s_rows_d, mask=m2, other=0.0)
        acc += v[:, None] * w.to(ACC)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rd, mask=md, other=0.0).to(ACC)
        acc += b[None, :]
    tl.store(out_ptr + rn[:, None] * s_out_n + rd[None, :] * s_out_d,
             acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gather_dot_kernel(idx_ptr, g_ptr, rows_ptr, out_ptr,
                       N, D,
                       s_idx_n, s_idx_k, s_g_n, s_g_d, s_rows_l, s_rows_d, s_out_n, s_out_k,
                       ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[i, j] = <g[i, :], rows[idx[i, j], :]>; one (row-block, j) per program
    pid_n = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mn = rn < N
    lat = tl.load(idx_ptr + rn * s_idx_n + j * s_idx_k, mask=mn, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        rd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m2 = mn[:, None] & (rd < D)[None, :]
        g = tl.load(g_ptr + rn[:, None] * s_g_n + rd[None, :] * s_g_d, mask=m2, other=0.0)
        w = tl.load(rows_ptr + lat[:, None] * s_rows_l + rd[None, :] * s_rows_d, mask=m2, other=0.0)
        acc += tl.sum(g.to(ACC) * w.to(ACC), axis=1)
    tl.store(out_ptr + rn * s_out_n + j * s_out_k, acc.to(out_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _segment_mm_kernel(brow_ptr, w_ptr, starts_ptr, x_ptr, out_ptr,
                       D, s_x_n, s_x_d, s_out_l, s_out_d,
                       ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[l, :] = sum_{e in segment l} w[e] * x[brow[e], :]; one (latent, d-tile) per program
    lat = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rd = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    md = rd < D
    start = tl.load(starts_ptr + lat)
    end = tl.load(starts_ptr + lat + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        re = e0 + tl.arange(0, BLOCK_E)
        me = re < end
        r = tl.load(brow_ptr + re, mask=me, other=0).to(tl.int64)
        w = tl.load(w_ptr + re, mask=me, other=0.0).to(ACC)
        xv = tl.load(x_ptr + r[:, None] * s_x_n + rd[None, :] * s_x_d,
                     mask=me[:, None] & md[None, :], other=0.0)
        acc += tl.sum(w[:, None] * xv.to(ACC), axis=0)
    tl.store(out_ptr + lat * s_out_l + rd * s_out_d, acc.to(out_ptr.dtype.element_ty), mask=md)


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(d: int) -> int:
    return max(16, min(128, triton.next_power_of_2(d)))


def _check_device(*tensors: torch.Tensor) -> None:
    if interpreting():
        return
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(
                "the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                f"interpreter); got a tensor on {t.device}. Use backend='torch' on CPU.")


def gather_mm(idx: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = sum_j vals[i, j] * rows[idx[i, j]] (+ bias)`` -> ``[N, d]``; ``rows`` may be strided."""
    _check_device(idx, vals, rows)
    n_rows, k = idx.shape
    d = rows.shape[1]
    out = torch.empty(n_rows, d, dtype=rows.dtype, device=rows.device)
    if n_rows == 0 or d == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()
    block_n, block_d = 32, _block_d(d)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(d, block_d))
    _gather_mm_kernel[grid](
        idx, vals, rows, bias if bias is not None else out, out,
        n_rows, k, d,
        idx.stride(0), idx.stride(1), vals.stride(0), vals.stride(1),
        rows.stride(0), rows.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, ACC=_acc(rows.dtype), BLOCK_N=block_n, BLOCK_D=block_d)
    return out


def gather_dot(idx: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = <grad[i], rows[idx[i, j]]>`` -> ``[N, K]`` (in ``rows``' dtype)."""
    _check_device(idx, grad, rows)
    n_rows, k = idx.shape
    d = rows.shape[1]
    out = torch.empty(n_rows, k, dtype=rows.dtype, device=rows.device)
    if n_rows == 0 or k == 0:
        return out
    block_n = 32
    grid = (triton.cdiv(n_rows, block_n), k)
    _gather_dot_kernel[grid](
        idx, grad, rows, out, n_rows, d,
        idx.stride(0), idx.stride(1), grad.stride(0), grad.stride(1),
        rows.stride(0), rows.stride(1), out.stride(0), out.stride(1),
        ACC=_acc(rows.dtype), BLOCK_N=block_n, BLOCK_D=_block_d(d))
    return out


def segment_mm(idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``out[l] = sum_{(i,j): idx[i,j]=l} vals[i,j] * x[i]`` -> ``[n, d]``; ``x`` may be strided."""
    _check_device(idx, vals, x)
    d = x.shape[1]
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n == 0 or d == 0:
        return out
    order, starts = _torch_ops.sort_by_latent(idx, n)
    batch_rows = torch.div(order, idx.shape[1], rounding_mode="floor")
    weights = vals.reshape(-1)[order].contiguous()
    block_d = _block_d(d)
    grid = (n, triton.cdiv(d, block_d))
    _segment_mm_kernel[grid](
        batch_rows, weights, starts, x, out,
        d, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        ACC=_acc(x.dtype), BLOCK_E=16, BLOCK_D=block_d)
    return out


def segment_sum(idx: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """``out[l] = sum_{(i,j): idx[i,j]=l} vals[i,j]``: ``segment_mm`` against a column of
    ones, so that it is deterministic too (``index_add_`` uses atomics on CUDA)."""
    ones = torch.ones(idx.shape[0], 1, dtype=vals.dtype, device=vals.device)
    return segment_mm(idx, vals, ones, n)[:, 0]
