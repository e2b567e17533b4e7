"""Triton kernels of ``kernels``: on CPU through the Triton interpreter, on CUDA for real.

Triton picks interpreting or compiling when ``triton.language`` is imported, and the test
session imports it early (transformers imports torch._dynamo, which imports triton). So the
interpreter cases (``case_*``) run in a child pytest started with ``TRITON_INTERPRET=1``
by ``test_triton_kernels_under_interpreter``; the parent session does not collect them.
Shapes are tiny: the interpreter is ~1000x slower than a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from test_kernels import F64, assert_close, decode_case, decode_inputs, encode_case, make_sae

HAS_TRITON = all(importlib.util.find_spec(m) is not None for m in ("triton", "numpy"))
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton (and numpy, for its interpreter) not installed")


@needs_triton
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-o", "python_functions=case_*", "-o", "addopts="],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@needs_triton
def test_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = make_sae()
    vals, idx = decode_inputs(37)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernels.sparse_decode(vals, idx, p["W_dec"], backend="triton")


# --------------------------------------------------------------------------- interpreter cases

def _interp():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_kernels_under_interpreter"
    from kernels import _torch_ops, _triton_ops
    return _torch_ops, _triton_ops


@pytest.mark.parametrize("n_rows,d,n,k", [(37, 20, 50, 3), (5, 150, 9, 1), (33, 7, 300, 4)])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def case_primitives_match_torch(n_rows, d, n, k, idx_dtype):
    """Rows > one block, d over one d-tile (150 > 128) and under 16, strided operands."""
    ref, tri = _interp()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (n_rows, k), generator=g).to(idx_dtype)
    idx[0, :] = idx[0, 0]  # repeated latent
    vals = torch.randn(n_rows, k, generator=g, dtype=F64)
    rows = torch.randn(d, n, generator=g, dtype=F64).t()  # strided [n, d]
    x = torch.randn(n_rows, d, generator=g, dtype=F64)
    bias = torch.randn(d, generator=g, dtype=F64)
    assert_close(tri.gather_mm(idx, vals, rows, bias), ref.gather_mm(idx, vals, rows, bias))
    assert_close(tri.gather_mm(idx, vals, rows), ref.gather_mm(idx, vals, rows))
    assert_close(tri.gather_dot(idx, x, rows), ref.gather_dot(idx, x, rows))
    assert_close(tri.segment_mm(idx, vals, x.t().contiguous().t(), n), ref.segment_mm(idx, vals, x, n))


def case_primitives_low_precision():
    ref, tri = _interp()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (9, 4), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        vals = torch.randn(9, 4, generator=g).to(dtype)
        rows = torch.randn(40, 24, generator=g).to(dtype)
        x = torch.randn(9, 24, generator=g).to(dtype)
        for name, args in (("gather_mm", (idx, vals, rows)), ("gather_dot", (idx, x, rows)),
                           ("segment_mm", (idx, vals, x, 40))):
            got, want = getattr(tri, name)(*args), getattr(ref, name)(*args)
            assert got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("with_bias", [True, False])
def case_decode_matches_reference(k, with_bias):
    _interp()
    p = make_sae()
    vals, idx = decode_inputs(37, k=k)
    want = decode_case("reference", vals, idx, p, with_bias)
    got = decode_case("triton", vals, idx, p, with_bias)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("layout", ["rows", "t"])
@pytest.mark.parametrize("mode,k", [("topk", 1), ("topk", 6), ("abstopk", 4), ("batchtopk", 3)])
def case_encode_matches_reference(mode, k, layout):
    _interp()
    p = make_sae(layout=layout)
    lead = (9,) if mode == "batchtopk" else (3, 3)
    x = torch.randn(*lead, 13, generator=torch.Generator().manual_seed(2), dtype=F64, requires_grad=True)
    want = encode_case("reference", mode, x, p, k)
    got = encode_case("triton", mode, x, p, k)
    for a, b in zip(got, want):
        assert_close(a, b)


def case_encode_relu_mask_and_aux():
    _interp()
    p = make_sae(bias_shift=-3.0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 13, generator=g, dtype=F64, requires_grad=True)
    dead = torch.zeros(37, dtype=torch.bool)
    dead[torch.randperm(37, generator=g)[:6]] = True
    want = encode_case("reference", "topk", x, p, 6, aux_k=8, dead=dead)
    got = encode_case("triton", "topk", x, p, 6, aux_k=8, dead=dead)
    assert (got[0] == 0).sum(1).max() > 37 - 6, "set-up must select latents with value 0"
    for a, b in zip(got, want):
        assert_close(a, b)


# --------------------------------------------------------------------------- real CUDA

@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
def test_triton_cuda_sae_step_matches_reference(dtype, mode):
    n_rows, d, n, k = 1000, 200, 3000, 32
    p = make_sae(d=d, n=n, dtype=dtype, device="cuda")
    x = torch.randn(n_rows, d, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(0))
    outs = []
    for be in ("reference", "auto"):
        enc = kernels.batch_topk_encode if mode == "batchtopk" else kernels.topk_encode
        vals, idx = enc(x - p["b_dec"], p["W_enc"], p["b_enc"], k, backend=be)
        x_hat = kernels.sparse_decode(vals, idx, p["W_dec"], p["b_dec"], backend=be)
        loss = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        loss.backward()
        outs.append([loss.detach()] + [t.grad.float() for t in p.values()])
        for t in p.values():
            t.grad = None
    assert kernels.resolve_backend("auto", x) == "triton"
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
