"""Tests for the fused sparse encode/decode (``kernels``): torch fast path and API.

The fused backend is compared with the dense autograd reference on forward values and on
every gradient, at odd shapes. The Triton kernels are tested in ``test_kernels_triton.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import select

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def make_sae(d=13, n=37, dtype=F64, seed=0, bias_shift=0.0, layout="rows", device="cpu"):
    """Random SAE parameters as leaves. ``layout="t"``: W_enc is a transposed view."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=F64)
    w_enc = w.clone() if layout == "rows" else w.t().contiguous().t()
    params = {
        "W_enc": w_enc,
        "b_enc": torch.randn(n, generator=g, dtype=F64) * 0.5 + bias_shift,
        "W_dec": torch.randn(n, d, generator=g, dtype=F64),
        "b_dec": torch.randn(d, generator=g, dtype=F64),
    }
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in params.items()}


def take_grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def assert_close(got, want, dtype=F64):
    tol = {F64: 1e-10, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def encode_case(backend, mode, x, p, k, upstream_seed=9, aux_k=0, dead=None):
    """Runs one encode + a random linear loss on the dense codes; returns codes and grads."""
    n = p["W_enc"].shape[0]
    if mode == "batchtopk":
        codes, aux = kernels.batch_topk_encode(x, p["W_enc"], p["b_enc"], k, backend=backend), None
    elif aux_k:
        codes, aux = kernels.topk_encode_with_aux(x, p["W_enc"], p["b_enc"], k, aux_k, dead, backend=backend)
    else:
        codes, aux = kernels.topk_encode(x, p["W_enc"], p["b_enc"], k, signed=mode == "abstopk",
                                         backend=backend), None
    g = torch.Generator().manual_seed(upstream_seed)
    dense = kernels.to_dense(codes, n)
    loss = (dense * torch.randn(dense.shape, generator=g, dtype=dense.dtype)).sum()
    outs = [dense.detach()]
    if aux is not None:
        dense_aux = kernels.to_dense(aux, n)
        loss = loss + (dense_aux * torch.randn(dense_aux.shape, generator=g, dtype=dense.dtype)).sum()
        outs.append(dense_aux.detach())
    loss.backward()
    return outs + take_grads(x, p["W_enc"], p["b_enc"])


def decode_case(backend, vals, idx, p, with_bias=True):
    out = kernels.sparse_decode(vals, idx, p["W_dec"], p["b_dec"] if with_bias else None, backend=backend)
    g = torch.Generator().manual_seed(11)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    leaves = [vals, p["W_dec"]] + ([p["b_dec"]] if with_bias else [])
    return [out.detach()] + take_grads(*leaves)


def decode_inputs(n, lead=(2, 3), k=5, dtype=F64, idx_dtype=torch.int64, seed=1):
    """Codes with the awkward cases: a repeated index in a row and a zero value."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (*lead, k), generator=g).to(idx_dtype)
    vals = torch.rand(*lead, k, generator=g, dtype=F64).to(dtype)
    flat_idx, flat_vals = idx.view(-1, k), vals.view(-1, k)
    if k > 1:
        flat_idx[0, 1] = flat_idx[0, 0]  # repeated latent: contributions add up
    flat_vals[-1, 0] = 0.0  # zero value (padding-style)
    return vals.requires_grad_(), idx


# --------------------------------------------------------------------------- decode

@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_decode_matches_reference(k, with_bias, idx_dtype):
    p = make_sae()
    vals, idx = decode_inputs(37, k=k, idx_dtype=idx_dtype)
    want = decode_case("reference", vals, idx, p, with_bias)
    got = decode_case("torch", vals, idx, p, with_bias)
    assert got[0].shape == (2, 3, 13)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_decode_gradcheck():
    p = make_sae(d=5, n=9)
    vals, idx = decode_inputs(9, lead=(4,), k=3)
    assert torch.autograd.gradcheck(
        lambda v, w, b: kernels.sparse_decode(v, idx, w, b, backend="torch"),
        (vals, p["W_dec"], p["b_dec"]))


def test_decode_only_needed_grads():
    p = make_sae()
    vals, idx = decode_inputs(37)
    vals = vals.detach()
    out = kernels.sparse_decode(vals, idx, p["W_dec"], None, backend="torch")
    out.sum().backward()
    assert vals.grad is None and p["W_dec"].grad is not None and p["b_dec"].grad is None


# --------------------------------------------------------------------------- encode

@pytest.mark.parametrize("layout", ["rows", "t"])
@pytest.mark.parametrize("mode,k", [("topk", 1), ("topk", 6), ("abstopk", 6), ("batchtopk", 3)])
def test_encode_matches_reference(mode, k, layout):
    p = make_sae(layout=layout)
    lead = (21,) if mode == "batchtopk" else (3, 7)
    x = torch.randn(*lead, 13, generator=torch.Generator().manual_seed(2), dtype=F64, requires_grad=True)
    want = encode_case("reference", mode, x, p, k)
    got = encode_case("torch", mode, x, p, k)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_encode_relu_mask_no_gradient_leak():
    """Selected latents whose pre-activation is <= 0 have value 0 and must get no gradient.

    A strongly negative encoder bias leaves rows with fewer than k positive pre-activations,
    so topk selects latents with value 0 (the trap seen in a peer's fused backward).
    """
    p = make_sae(bias_shift=-3.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 13, generator=g, dtype=F64, requires_grad=True)
    k, n = 8, 37
    vals, idx = kernels.topk_encode(x, p["W_enc"], p["b_enc"], k, backend="torch")
    assert (vals == 0).sum() > 0, "set-up must select latents with value 0"
    upstream = torch.randn(16, k, generator=g, dtype=F64)
    (vals * upstream).sum().backward()
    got_b, got_x = p["b_enc"].grad.clone(), x.grad.clone()

    active = vals.detach() > 0
    want_b = torch.zeros(n, dtype=F64).index_add_(0, idx[active], upstream[active])
    assert_close(got_b, want_b)
    leaky_b = torch.zeros(n, dtype=F64).index_add_(0, idx.reshape(-1), upstream.reshape(-1))
    assert not torch.allclose(leaky_b, want_b), "a leaky backward must be distinguishable"

    x.grad = p["b_enc"].grad = None
    ref_vals, _ = kernels.topk_encode(x, p["W_enc"], p["b_enc"], k, backend="reference")
    (ref_vals * upstream).sum().backward()
    assert_close(got_x, x.grad)


def test_abstopk_keeps_sign():
    p = make_sae()
    x = torch.randn(10, 13, dtype=F64)
    vals, idx = kernels.topk_encode(x, p["W_enc"], p["b_enc"], 5, signed=True, backend="torch")
    pre = x @ p["W_enc"].detach().t() + p["b_enc"].detach()
    assert (vals < 0).any()
    assert_close(vals.detach(), pre.gather(1, idx))
    assert (vals.abs().min(1).values >= pre.abs().topk(5).values[:, -1] - 1e-12).all()


def test_batch_topk_selects_top_n_times_k():
    """Exactly N*k entries over the batch, the largest ones; rows vary in count."""
    p = make_sae()
    x = torch.randn(12, 13, dtype=F64, generator=torch.Generator().manual_seed(0))
    x[0] *= 20  # one loud row takes more than k latents
    vals, idx = kernels.batch_topk_encode(x, p["W_enc"], p["b_enc"], 3, backend="torch")
    dense = kernels.to_dense((vals.detach(), idx), 37)
    acts = torch.relu(x @ p["W_enc"].detach().t() + p["b_enc"].detach())
    assert (dense > 0).sum() == (acts.reshape(-1).topk(36).values > 0).sum()
    kept = torch.zeros_like(acts, dtype=torch.bool).view(-1)
    kept[acts.reshape(-1).topk(36).indices] = True
    assert_close(dense, acts * kept.view_as(acts))
    counts = (vals > 0).sum(1)
    assert counts[0] > 3 and counts.max() == vals.shape[1]


def test_batch_topk_candidate_retry_is_exact():
    """A row holding more than the 4k first-pass candidates forces the doubling retry."""
    p = make_sae(n=64)
    x = torch.randn(8, 13, dtype=F64, requires_grad=True)
    with torch.no_grad():
        x[0] *= 50
    want = encode_case("reference", "batchtopk", x, p, 2)
    got = encode_case("torch", "batchtopk", x, p, 2)
    assert (got[0][0] > 0).sum() > 4 * 2, "set-up must exceed the first-pass candidates"
    for a, b in zip(got, want):
        assert_close(a, b)


def test_encode_aux_matches_reference():
    p = make_sae()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 13, generator=g, dtype=F64, requires_grad=True)
    dead = torch.zeros(37, dtype=torch.bool)
    dead[torch.randperm(37, generator=g)[:6]] = True
    # aux_k (9) > number of dead latents (6): the AuxK codes are 6 wide, one per dead latent
    want = encode_case("reference", "topk", x, p, 5, aux_k=9, dead=dead)
    got = encode_case("torch", "topk", x, p, 5, aux_k=9, dead=dead)
    for a, b in zip(got, want):
        assert_close(a, b)
    assert (got[1][:, ~dead] == 0).all()
    _, aux = kernels.topk_encode_with_aux(x, p["W_enc"], p["b_enc"], 5, 9, dead, backend="torch")
    assert aux.values.shape == (10, 6) and set(aux.indices.unique().tolist()) <= set(dead.nonzero().flatten().tolist())


@pytest.mark.parametrize("mode", ["topk", "abstopk", "batchtopk", "aux"])
def test_encode_gradcheck(mode):
    p = make_sae(d=4, n=10, seed=5)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=F64, requires_grad=True)
    dead = torch.arange(10) < 5

    def f(x_, w, b):
        if mode == "aux":
            codes, aux = kernels.topk_encode_with_aux(x_, w, b, 3, 2, dead, backend="torch")
            return codes.values, aux.values
        if mode == "batchtopk":
            return kernels.batch_topk_encode(x_, w, b, 3, backend="torch").values
        return kernels.topk_encode(x_, w, b, 3, signed=mode == "abstopk", backend="torch").values
    assert torch.autograd.gradcheck(f, (x, p["W_enc"], p["b_enc"]))


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
def test_encode_chunking_does_not_change_results(monkeypatch, mode):
    p = make_sae()
    x = torch.randn(37, 13, dtype=F64, requires_grad=True)
    whole = encode_case("torch", mode, x, p, 5)
    monkeypatch.setattr(select, "PREACT_CHUNK_ELEMS", 37 * 4)  # 4 rows at a time
    chunked = encode_case("torch", mode, x, p, 5)
    for a, b in zip(chunked, whole):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_sae_step_low_precision(dtype):
    """A whole TopK SAE step (encode, decode, MSE, backward) in fp32 / bf16 agrees with the
    dense reference run in the same dtype (same latents selected; rounding differs)."""
    results = []
    for be in ("reference", "torch"):
        p = make_sae(d=16, n=64, dtype=dtype, seed=6)
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
        vals, idx = kernels.topk_encode(x - p["b_dec"], p["W_enc"], p["b_enc"], 8, backend=be)
        x_hat = kernels.sparse_decode(vals, idx, p["W_dec"], p["b_dec"], backend=be)
        loss = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        loss.backward()
        results.append([idx, loss.detach()] + [t.float() for t in take_grads(*p.values())])
    want, got = results
    assert torch.equal(got[0], want[0])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


# --------------------------------------------------------------------------- memory

class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
def test_fused_path_never_keeps_or_builds_dense_latents(mode):
    """No [N, n_latents] tensor is saved for backward, and the backward (and the decode
    forward) create nothing that large; the reference does both (so the probes work)."""
    n_rows, d, n, k = 64, 8, 8192, 4
    p = make_sae(d=d, n=n, dtype=torch.float32)
    x = torch.randn(n_rows, d, requires_grad=True)
    dense_numel = n_rows * n

    def probe(be):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            if mode == "batchtopk":
                vals, idx = kernels.batch_topk_encode(x, p["W_enc"], p["b_enc"], k, backend=be)
            else:
                vals, idx = kernels.topk_encode(x, p["W_enc"], p["b_enc"], k, backend=be)
            with _LargestTensor() as created:
                x_hat = kernels.sparse_decode(vals, idx, p["W_dec"], p["b_dec"], backend=be)
                x_hat.pow(2).sum().backward()
        return max(saved), created.largest

    saved, created = probe("torch")
    assert saved <= n * d < dense_numel // 4  # the largest saved tensors are the weights
    assert created <= n * d
    ref_saved, ref_created = probe("reference")
    assert ref_saved >= dense_numel and ref_created >= dense_numel


# --------------------------------------------------------------------------- backends, API

def test_backend_resolution():
    x = torch.zeros(2, 3)
    assert kernels.resolve_backend("auto", x) == "torch"
    assert kernels.resolve_backend(None, x) == "torch"
    assert kernels.resolve_backend("reference", x) == "reference"
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.resolve_backend("cutlass", x)
    assert kernels.available_backends("cpu")[-2:] == ["torch", "reference"]


def test_input_validation():
    p = make_sae()
    x = torch.randn(4, 13, dtype=F64)
    with pytest.raises(ValueError, match="last dim"):
        kernels.topk_encode(torch.randn(4, 12, dtype=F64), p["W_enc"], p["b_enc"], 3)
    with pytest.raises(ValueError, match="k must be"):
        kernels.topk_encode(x, p["W_enc"], p["b_enc"], 38)
    with pytest.raises(ValueError, match="b_enc"):
        kernels.topk_encode(x, p["W_enc"], p["b_enc"][:5], 3)
    with pytest.raises(ValueError, match="dead_mask"):
        kernels.topk_encode_with_aux(x, p["W_enc"], p["b_enc"], 3, 4, torch.zeros(37))
    with pytest.raises(ValueError, match=r"\[N, d_in\]"):
        kernels.batch_topk_encode(x[None], p["W_enc"], p["b_enc"], 3)
    with pytest.raises(ValueError, match="differ in shape"):
        kernels.sparse_decode(torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.long), p["W_dec"])
    with pytest.raises(ValueError, match="swap"):
        kernels.sparse_decode(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), p["W_dec"])


def test_no_bias():
    p = make_sae()
    x = torch.randn(5, 13, dtype=F64, requires_grad=True)
    outs = []
    for be in ("reference", "torch"):
        vals, idx = kernels.topk_encode(x, p["W_enc"], None, 3, backend=be)
        x_hat = kernels.sparse_decode(vals, idx, p["W_dec"], None, backend=be)
        x_hat.pow(2).sum().backward()
        outs.append([x_hat.detach()] + take_grads(x, p["W_enc"], p["W_dec"]))
    for a, b in zip(*outs):
        assert_close(a, b)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_is_light():
    """``import kernels`` imports no triton and defines no ``__version__``."""
    proc = _python("import sys, kernels\n"
                   "assert 'triton' not in sys.modules, 'kernels imported triton'\n"
                   "assert not hasattr(kernels, '__version__')\n"
                   "print(kernels.__file__)\n")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().parent == ROOT / "kernels"


def test_transformers_does_not_mistake_our_kernels_for_hf_kernels():
    """PyPI's unrelated ``kernels`` (Hugging Face) is what transformers probes for; ours must
    not pass for it, or transformers would reach for hub kernels (GGUF loading among others)."""
    proc = _python(
        "import importlib.util, torch\n"
        "print(importlib.util.find_spec('kernels').origin)\n"
        "from transformers.utils import import_utils\n"
        "assert not import_utils.is_kernels_available(), 'transformers thinks hub kernels are installed'\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=2)\n"
        "assert LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)\n")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[0]).resolve().parent == ROOT / "kernels"


def test_benchmark_runs_small():
    import json

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_speed.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    impls = {(r["op"], r["impl"]) for r in report["results"]}
    assert {("decode", "kernels-torch"), ("encode", "kernels-torch"), ("decode", "dense")} <= impls
    assert all(r["max_abs_err_vs_dense"] < 1e-3 for r in report["results"])
