"""Latent selections for the fused encoder, computed without autograd, chunk by chunk.

Each returns ``(vals, idx)`` of shape ``[N, K]``. Pre-activations ``x @ W_enc^T + b_enc``
are formed ``PREACT_CHUNK_ELEMS // n_latents`` rows at a time, so the transient ``[rows, n]``
buffer stays bounded whatever the batch size, and none of it outlives the call.

These stay torch calls on CUDA too, under the Triton backend: the dense GEMM is cuBLAS's job,
and ``torch.topk`` over a chunk of rows is already a tuned GPU kernel; a Triton top-k would
have to merge per-tile candidates across all ``n_latents`` columns for no gain. Triton
covers what torch has no fused op for: the sparse gathers and scatters in ``_triton_ops``.
"""

from __future__ import annotations

import threading

import torch

# 2**24 elements: 64 MiB of fp32 pre-activations at a time.
PREACT_CHUNK_ELEMS = 1 << 24

_scratch = threading.local()


def scratch(key, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU buffer of ``shape`` kept per thread and ``key`` and reused by the next call (grown
    when too small): glibc serves a fresh multi-MB tensor from a new mmap whose pages fault in
    on first write, which measured ~15% of the encoder GEMM's own time on every call."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    numel = 1
    for size in shape:
        numel *= size
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(*shape)


def chunk_buffer(rows, n, dtype, device):
    """A ``[rows, n]`` buffer for one chunk of pre-activations, reused on CPU (see ``scratch``);
    on CUDA the caching allocator already reuses memory."""
    if device.type != "cpu":
        return torch.empty(rows, n, dtype=dtype, device=device)
    return scratch(("preacts", dtype), rows, n, dtype=dtype)


@torch.no_grad()
def preacts(x, w_enc, b_enc):
    """Yields ``(start, end, pre)`` over row chunks of ``x @ W_enc^T + b_enc``. Each ``pre``
    is scratch: it is overwritten by the next chunk (and the next call), so use it in place."""
    n_rows, n = x.shape[0], w_enc.shape[0]
    step = min(n_rows, max(1, PREACT_CHUNK_ELEMS // max(1, n)))
    buf = chunk_buffer(step, n, torch.result_type(x, w_enc), x.device)
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        pre = buf[: e - s]
        if b_enc is None:
            torch.mm(x[s:e], w_enc.t(), out=pre)
        else:
            torch.addmm(b_enc, x[s:e], w_enc.t(), out=pre)
        yield s, e, pre


def _empty(x, n_rows, k, dtype):
    return (torch.empty(n_rows, k, dtype=dtype, device=x.device),
            torch.empty(n_rows, k, dtype=torch.long, device=x.device))


def topk(x, w_enc, b_enc, k, signed=False, aux_k=0, dead_mask=None):
    """Per-row top ``k``: of ``relu(pre)``, or by ``|pre|`` keeping the sign (``signed``).

    With ``aux_k``, also the top ``aux_k`` ReLU'd pre-activations among ``dead_mask`` latents
    (from the same GEMM); returns ``(vals, idx, aux_vals, aux_idx)``. ``aux_k`` must not
    exceed the number of dead latents.
    """
    n_rows = x.shape[0]
    dtype = torch.result_type(x, w_enc)
    vals, idx = _empty(x, n_rows, k, dtype)
    aux_vals, aux_idx = _empty(x, n_rows, aux_k, dtype)
    dead = dead_mask.nonzero().flatten() if aux_k else None
    for s, e, pre in preacts(x, w_enc, b_enc):
        if signed:
            i = pre.abs().topk(k, dim=1).indices
            vals[s:e], idx[s:e] = pre.gather(1, i), i
        else:
            vals[s:e], idx[s:e] = top_k_rows(pre, k)
        if aux_k:
            # only the dead latents' columns compete (a few percent of them, once training runs)
            aux_vals[s:e], local = top_k_rows(pre.index_select(1, dead), aux_k)
            aux_idx[s:e] = dead[local]
    if not signed:
        vals.relu_()
    aux_vals.relu_()
    return vals, idx, aux_vals, aux_idx


BLOCK = 32


def top_k_rows(pre, k):
    """``pre.topk(k, dim=1)`` (values descending; the same values, and the same latents up to
    ties), about twice as fast on CPU for ``k`` much smaller than the row.

    Split each row into blocks of ``BLOCK`` and take the ``k`` blocks with the largest maxima:
    the smallest of those maxima, ``t``, is reached by ``k`` entries, so the row's top ``k``
    are all ``>= t`` and lie in those blocks. The (few, about ``k``) entries there that reach
    ``t`` are compacted per row and ranked with a small ``topk``. torch's CPU ``topk`` spends
    a few ns per entry; this touches each entry once, in a vectorised max.
    """
    n_rows, n = pre.shape
    if pre.device.type != "cpu" or n % BLOCK or n < 4 * k * BLOCK:
        return pre.topk(k, dim=1)  # CUDA's topk is a fast radix select; small rows gain nothing
    n_blocks = n // BLOCK
    blocks = pre.view(n_rows, n_blocks, BLOCK)
    block_max, block = blocks.amax(-1).topk(k, dim=1, sorted=False)
    threshold = block_max.amin(1, keepdim=True)
    first = torch.arange(0, n_rows * n_blocks, n_blocks, device=pre.device)[:, None]
    cand = blocks.reshape(-1, BLOCK).index_select(0, (block + first).view(-1)).view(n_rows, k * BLOCK)
    rows, pos = (cand >= threshold).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=n_rows)
    if rows.numel() == 0 or int(counts.min()) < k:  # NaNs: the threshold compares false
        return pre.topk(k, dim=1)
    col = torch.arange(rows.numel(), device=pre.device) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max())
    packed = pre.new_full((n_rows, width), float("-inf"))
    packed[rows, col] = cand[rows, pos]
    latent = torch.zeros(n_rows, width, dtype=torch.long, device=pre.device)
    latent[rows, col] = block[rows, pos.div(BLOCK, rounding_mode="floor")] * BLOCK + pos % BLOCK
    top, j = packed.topk(k, dim=1)
    return top, latent.gather(1, j)


def batch_topk(x, w_enc, b_enc, k):
    """The top ``N * k`` of ``relu(pre)`` over the whole batch, padded per row (see ``pad_rows``).

    Exact, without holding all ``N x n`` pre-activations: each row keeps its top ``C``
    candidates (``C = 4k`` first); the global top ``N*k`` among candidates equals the global
    top ``N*k`` overall unless some row had all ``C`` of its candidates chosen, in which case
    the pass is redone with ``C`` doubled.
    """
    n_rows, n = x.shape[0], w_enc.shape[0]
    total = n_rows * k
    c = min(n, 4 * k)
    while True:
        cand_vals, cand_idx = _empty(x, n_rows, c, torch.result_type(x, w_enc))
        for s, e, pre in preacts(x, w_enc, b_enc):
            cand_vals[s:e], cand_idx[s:e] = pre.relu_().topk(c, dim=1)
        picked_vals, picked = cand_vals.view(-1).topk(total)
        rows = torch.div(picked, c, rounding_mode="floor")
        if c == n or torch.bincount(rows, minlength=n_rows).max() < c:
            return pad_rows(rows, cand_idx.view(-1)[picked], picked_vals, n_rows)
        c = min(n, 2 * c)


def threshold(x, w_enc, b_enc, theta):
    """Every pre-activation above ``theta`` (a scalar or ``[n]``, per latent) and above 0,
    padded per row (see ``pad_rows``); latents keep ascending order within a row."""
    rows, latents, values = [], [], []
    for s, _, pre in preacts(x, w_enc, b_enc):
        r, c = ((pre > theta) & (pre > 0)).nonzero(as_tuple=True)
        rows.append(r + s)
        latents.append(c)
        values.append(pre[r, c])
    return pad_rows(torch.cat(rows), torch.cat(latents), torch.cat(values), x.shape[0])


def pad_rows(rows, latents, values, n_rows):
    """Scatter a flat selection ``(rows, latents, values)`` into ``[n_rows, K]`` arrays.

    ``K`` is the largest count in any row; padding entries have value 0 and index 0.
    Differentiable in ``values``.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if rows.numel() else 0
    order = torch.argsort(rows, stable=True)
    rows = rows[order]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    vals = values.new_zeros(n_rows, width).index_put((rows, pos), values[order])
    idx = torch.zeros(n_rows, width, dtype=torch.long, device=rows.device)
    idx[rows, pos] = latents[order]
    return vals, idx
