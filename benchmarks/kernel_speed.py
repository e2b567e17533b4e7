"""Benchmark the fused sparse encode/decode (``kernels``) against dense and peer approaches.

Prints one JSON object on stdout (a readable table goes to stderr). Implementations:

- ``dense``: densify the codes and use dense matmuls, differentiated by autograd (what
  SAELens-style TopK SAEs do; this package's ``reference`` backend);
- ``ebag-autograd`` (decode and step): ``F.embedding_bag`` decode differentiated by plain
  autograd (the eager decode path of EleutherAI's sparsify);
- ``kernels-torch``: this package's torch fast path (the CPU default);
- ``kernels-triton``: this package's Triton kernels (CUDA only).

Ops: ``decode`` (codes -> reconstruction), ``encode`` (x -> TopK codes), ``encode-batch``
(BatchTopK), ``step`` (a whole TopK SAE step: encode, decode, MSE, backward).

Per result: ``fwd_ms`` and ``fwd_bwd_ms`` (median of ``--repeats`` after a warm-up),
``speedup_vs_dense`` (fwd+bwd), ``saved_mib`` (activation memory autograd keeps for backward,
inputs and parameters excluded), ``peak_extra_mib`` (CPU: peak RSS growth of a fresh process
running one fwd+bwd over its set-up; CUDA: ``max_memory_allocated`` growth) and
``max_abs_err_vs_dense`` (output and every gradient). ``goals`` checks the targets: decode
fwd+bwd >= 5x faster than dense, and no ``[N, n_latents]`` tensor kept for backward by the
fused encoder.

    python benchmarks/kernel_speed.py                      # B=4096 d=576 n=9216 k=32, 2 CPU threads
    python benchmarks/kernel_speed.py --device cuda --batch 16384
    python benchmarks/kernel_speed.py --quick              # tiny shapes, in-process (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402

IMPLS = {
    "decode": ("dense", "ebag-autograd", "kernels-torch", "kernels-triton"),
    "encode": ("dense", "kernels-torch", "kernels-triton"),
    "encode-batch": ("dense", "kernels-torch", "kernels-triton"),
    "step": ("dense", "ebag-autograd", "kernels-torch", "kernels-triton"),
}
BACKEND = {"dense": "reference", "ebag-autograd": "reference",
           "kernels-torch": "torch", "kernels-triton": "triton"}


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    b, d, n, k = args.batch, args.d_in, args.n_latents, args.k

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # distinct latents per row, as topk gives; drawn in chunks to keep set-up memory small
    idx = torch.cat([torch.multinomial(torch.ones(min(256, b - s), n), k, generator=g)
                     for s in range(0, b, 256)])
    w_enc = randn(n, d, scale=d ** -0.5)
    return {"x": randn(b, d), "W_enc": w_enc, "b_enc": randn(n, scale=0.01),
            "W_dec": w_enc.clone(), "b_dec": randn(d, scale=0.01), "idx": idx.to(device),
            "vals": torch.rand(b, k, generator=g).to(device=device, dtype=dtype), "grad_out": randn(b, d)}


def build(op, impl, inp, k):
    """Returns ``(fwd, leaves)``: ``fwd()`` gives ``(output, upstream_grad or None)``."""
    leaf = {key: t.detach().clone().requires_grad_(t.is_floating_point()) for key, t in inp.items()}
    backend = BACKEND[impl]
    if op == "decode":
        vals, idx, w_dec, b_dec = leaf["vals"], inp["idx"], leaf["W_dec"], leaf["b_dec"]
        if impl == "ebag-autograd":
            def fwd():
                return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + b_dec, inp["grad_out"]
        else:
            def fwd():
                return kernels.sparse_decode(vals, idx, w_dec, b_dec, backend=backend), inp["grad_out"]
        return fwd, [vals, w_dec, b_dec]

    x, w_enc, b_enc = leaf["x"], leaf["W_enc"], leaf["b_enc"]
    if op in ("encode", "encode-batch"):
        enc = kernels.batch_topk_encode if op == "encode-batch" else kernels.topk_encode

        def fwd():
            # values are compared sorted (row order of selected latents may differ);
            # the upstream gradient is 1 on every selected value
            vals = enc(x, w_enc, b_enc, k, backend=backend).values
            return vals, torch.ones_like(vals)
        return fwd, [x, w_enc, b_enc]

    w_dec, b_dec = leaf["W_dec"], leaf["b_dec"]

    def fwd():
        vals, idx = kernels.topk_encode(x - b_dec, w_enc, b_enc, k, backend=backend)
        if impl == "ebag-autograd":
            x_hat = F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + b_dec
        else:
            x_hat = kernels.sparse_decode(vals, idx, w_dec, b_dec, backend=backend)
        return (x_hat - x).pow(2).sum(-1).mean(), None
    return fwd, [x, w_enc, b_enc, w_dec, b_dec]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fwd, leaves, saved=None):
    for t in leaves:
        t.grad = None
    if saved is None:
        out, grad = fwd()
    else:
        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, grad = fwd()
    out.backward(grad)
    return out


def measure(op, impl, args, device):
    inp = make_inputs(args, device)
    fwd, leaves = build(op, impl, inp, args.k)
    inputs = {t.untyped_storage().data_ptr() for t in list(inp.values()) + leaves}
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = {}
    out = _fwd_bwd(fwd, leaves, saved)  # warm-up; also the memory measurements
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    saved_bytes = sum(nbytes for ptr, nbytes in saved.items() if ptr not in inputs)
    res = {"op": op, "impl": impl, "peak_extra_mib": round(peak / 2**20, 1),
           "saved_mib": round(saved_bytes / 2**20, 1),
           "output": out.detach().float().sort(dim=-1).values.cpu() if out.dim() else out.detach().float().cpu(),
           "grads": [t.grad.detach().float().cpu() for t in leaves]}
    for key, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            if backward:
                _fwd_bwd(fwd, leaves)
            else:
                with torch.no_grad():
                    fwd()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        res[key] = round(statistics.median(times), 2)
    return res


def _isolated(op, impl, args, tmp):
    """One measurement in a fresh process, so its peak RSS is its own."""
    out_file = Path(tmp) / f"{op}-{impl}.pt"
    cmd = [sys.executable, __file__, "--worker", f"{op}:{impl}:{out_file}", "--device", args.device,
           "--dtype", args.dtype, "--batch", str(args.batch), "--d-in", str(args.d_in),
           "--n-latents", str(args.n_latents), "--k", str(args.k), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {op}/{impl} failed:\n{proc.stderr}")
    res = json.loads(proc.stdout)
    res.update(torch.load(out_file))
    return res


def _max_err(a, b):
    pairs = [(a["output"], b["output"])] + list(zip(a["grads"], b["grads"]))
    return max((x - y).abs().max().item() for x, y in pairs)


def _goals(rows, args):
    def get(op, impl, key):
        return next((r[key] for r in rows if r["op"] == op and r["impl"] == impl), None)

    dense_bytes = args.batch * args.n_latents * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    goals = {}
    speedup = get("decode", "kernels-torch", "speedup_vs_dense")
    if speedup is not None:
        goals["decode_fwd_bwd_5x_faster_than_dense"] = {"value": speedup, "ok": speedup >= 5}
    saved = get("encode", "kernels-torch", "saved_mib")
    if saved is not None:
        goals["encode_saves_no_dense_latents"] = {
            "saved_mib": saved, "dense_latents_mib": round(dense_bytes / 2**20, 1),
            "ok": saved * 2**20 < dense_bytes}
    return goals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--n-latents", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--ops", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, in-process (smoke test)")
    p.add_argument("--in-process", action="store_true",
                   help="on CPU, measure all in this process (faster; peak_extra_mib then unreliable)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.d_in, args.n_latents, args.k, args.repeats, args.in_process = 64, 24, 200, 4, 1, True
    device = torch.device(args.device)

    if args.worker:
        op, impl, out_file = args.worker.split(":", 2)
        res = measure(op, impl, args, device)
        torch.save({"output": res.pop("output"), "grads": res.pop("grads")}, out_file)
        print(json.dumps(res))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op in args.ops.split(","):
            results = []
            for impl in IMPLS[op]:
                if impl == "kernels-triton" and "triton" not in kernels.available_backends(device):
                    continue
                isolate = device.type == "cpu" and not args.in_process
                results.append(_isolated(op, impl, args, tmp) if isolate else measure(op, impl, args, device))
            dense = results[0]
            for r in results:
                r["speedup_vs_dense"] = round(dense["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
                r["max_abs_err_vs_dense"] = _max_err(r, dense)
                rows.append({key: v for key, v in r.items() if key not in ("output", "grads")})

    config = {key: v for key, v in vars(args).items() if key not in ("worker", "quick")}
    config.update(torch=torch.__version__, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(json.dumps({"config": config, "results": rows, "goals": _goals(rows, args)}, indent=1))
    print(f"{'op':13} {'impl':15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x dense':>8} {'saved MiB':>10} "
          f"{'peak MiB':>9} {'max err':>9}", file=sys.stderr)
    for r in rows:
        print(f"{r['op']:13} {r['impl']:15} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} {r['speedup_vs_dense']:8.2f} "
              f"{r['saved_mib']:10.1f} {r['peak_extra_mib']:9.1f} {r['max_abs_err_vs_dense']:9.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
