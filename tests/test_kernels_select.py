"""The CPU selection shortcuts in ``kernels.select`` agree with plain ``torch.topk``."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import select


@pytest.mark.parametrize("n,k", [(512, 4), (1024, 8), (4096, 32), (640, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_rows_matches_topk(n, k, ties):
    g = torch.Generator().manual_seed(n + k)
    pre = torch.randn(67, n, generator=g) + torch.randn(n, generator=g)  # per-column offsets, like a bias
    if ties:
        pre = (pre * 2).round()  # many equal values, also across the block threshold
    pre[5] = float("-inf")
    pre[6, : n // 2] = float("-inf")
    want_vals, want_idx = pre.topk(k, dim=1)
    vals, idx = select.top_k_rows(pre, k)
    torch.testing.assert_close(vals, want_vals, rtol=0, atol=0)
    assert torch.equal(pre.gather(1, idx), vals)  # the indices point at those values
    assert (idx.sort(dim=1).values.diff(dim=1) != 0).all()  # distinct latents per row
    if not ties:
        distinct_rows = torch.ones(67, dtype=torch.bool)
        distinct_rows[5] = False
        assert torch.equal(idx[distinct_rows], want_idx[distinct_rows])


def test_top_k_rows_nan_and_small_rows_fall_back():
    pre = torch.randn(4, 512)
    pre[1, 100] = float("nan")
    for k in (4, 16):  # 16 * 4 blocks > 512 / 32: plain topk
        want_vals, want_idx = pre.topk(k, dim=1)
        vals, idx = select.top_k_rows(pre, k)
        torch.testing.assert_close(vals, want_vals, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(idx, want_idx)


def test_aux_selection_among_few_dead_latents_matches_reference():
    """AuxK among dead latents (more and fewer dead than k_aux): same dense codes and grads."""
    g = torch.Generator().manual_seed(3)
    n, d = 1024, 16
    x = torch.randn(40, d, generator=g, dtype=torch.float64)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    for n_dead in (3, 50):
        dead = torch.zeros(n, dtype=torch.bool)
        dead[torch.randperm(n, generator=g)[:n_dead]] = True
        results = []
        for backend in ("reference", "torch"):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            main, aux = kernels.topk_encode_with_aux(*leaves, 8, 10, dead, backend=backend)
            dense = kernels.to_dense(main, n), kernels.to_dense(aux, n)
            weights = torch.randn(2, *dense[0].shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
            ((dense[0] * weights[0]).sum() + (dense[1] * weights[1]).sum()).backward()
            results.append([t.detach() for t in dense] + [t.grad for t in leaves])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want)


def test_preactivation_scratch_is_not_aliased_by_results():
    """Results of one call survive the next call, which reuses the scratch buffer."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1024, 8, generator=g), torch.randn(1024, generator=g)
    x1, x2 = torch.randn(33, 8, generator=g), torch.randn(33, 8, generator=g)
    first = kernels.topk_encode(x1, w, b, 4)
    kept = [t.clone() for t in first]
    kernels.topk_encode(x2, w, b, 4)
    assert all(torch.equal(a, c) for a, c in zip(first, kept))
    assert torch.equal(first.values, kernels.topk_encode(x1, w, b, 4, backend="reference").values)
