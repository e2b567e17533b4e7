"""TopK SAE training throughput as a fraction of the one-GEMM bound, measured in one process.

The bound: a TopK training step cannot be faster than its encoder forward, the dense
``[B, d_in] x [d_in, n_latents]`` GEMM (every latent competes for the top k); everything else
(selection, sparse decode, sparse backward, Adam, renormalisation, bookkeeping) is overhead.
This script times that GEMM alone (``torch.mm`` into a preallocated output, same shapes and
threads, on the SAE's own encoder weights) and full ``sae.Trainer.train_step`` calls on real
activations, alternating one GEMM and one step so that both see the same machine load, and
reports:

- ``tokens_per_s`` (timed steps only, after ``--warmup`` steps), ``gemm_bound_tokens_per_s``
  (B / median GEMM time) and ``fraction_of_gemm_bound`` (median GEMM time / median step time);
- ``fvu_heldout``: FVU of the trained SAE on a held-out batch after warm-up + timed steps
  (fixed data, seed and constant LR, so it compares across code versions);
- ``phases_ms``: a per-step breakdown from ``torch.profiler`` over ``--profile-steps`` extra
  steps (run after the FVU; profiling slows small ops, so shares matter more than totals).

Data: an activation cache (``--cache``, default /work/data/cache-l15, written by
``sae cache``); without one, synthetic correlated Gaussian activations (``--synthetic`` forces
them). The machine's load average is recorded: on a shared machine only the ratios measured
in one run mean anything, and ``--threads 1 --clock cpu`` (CPU time instead of wall time)
keeps them steady.

    python benchmarks/gemm_bound.py                 # B=4096 d=576 n=9216 k=32, 2 threads, ~1 min
    python benchmarks/gemm_bound.py --quick         # tiny shapes (a smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

import sae  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_data(args, n_rows: int) -> tuple[torch.Tensor, dict]:
    """[n_rows, d] fp32 activations, shuffled by the cache reader (seeded), or synthetic."""
    if not args.synthetic and Path(args.cache, "manifest.json").is_file():
        from activations.cache import CachedActivations

        cache = CachedActivations(args.cache, verify=False)
        rows, have = [], 0
        for b in cache.batches(4096, seed=args.seed):
            rows.append(b)
            have += b.shape[0]
            if have >= n_rows:
                break
        x = torch.cat(rows)[:n_rows].float().contiguous()
        if x.shape[0] < n_rows:
            raise SystemExit(f"{args.cache} holds {x.shape[0]} tokens, need {n_rows}: lower --steps or --batch-size")
        return x, {"source": f"cache {args.cache}", "model": cache.model, "site": cache.sites[0]}
    g = torch.Generator().manual_seed(args.seed)
    d = args.d_in
    x = torch.randn(n_rows, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5) + 3 * torch.randn(d, generator=g)
    return x, {"source": "synthetic (correlated Gaussian)"}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PATHS = {"fused": "auto", "autograd": "torch"}
"""The trainer's two CPU paths, by kernel_backend: the native fused TopK step (auto) and the torch
ops under autograd (torch)."""


def timed(fn, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    start = now()
    fn()
    return now() - start


# -- the per-phase profile -------------------------------------------------------------------
# Each profiled op's self time goes to the first phase whose marker appears in its chain of
# enclosing profiler events (ops, autograd nodes, Python frames), checked in this order.
PHASES = [
    ("encode GEMM", ("fused: encode GEMM",)),
    ("top-k selection", ("fused: top-k",)),
    ("encoder input and total variance", ("fused: encoder input",)),
    ("decode, loss and all gradients (native)", ("fused: loss and gradients",)),
    ("optimiser and decoder renormalisation (native)", ("fused: Adam",)),
    ("backward: encoder (sparse dx, dW_enc, db_enc)", ("SparseEncodeBackward",)),
    ("backward: decoder (sparse dvals, dW_dec)", ("SparseDecodeBackward",)),
    ("backward: loss, grad accumulation, engine", ("run_backward", "_tensor.py(", "autograd/__init__.py(")),
    ("encode GEMM", ("@gemm",)),
    ("top-k selection", ("SparseEncode",)),
    ("decode", ("SparseDecode",)),
    ("decoder grad projection", ("remove_parallel_grads",)),
    ("grad clipping", ("clip_grad",)),
    ("optimiser (Adam, zero_grad)", ("Optimizer.step", "zero_grad")),
    ("decoder renormalisation", ("after_step",)),
    ("loss (FVU)", (": fvu",)),
    ("input check and centring", ("check_input", ": centered")),
    ("dead-latent bookkeeping and metrics", ("train_step",)),
]
GEMM_OPS = ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear")


def phase_of(event) -> str | None:
    chain, e = [], event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    if not any("train_step" in name for name in chain):
        return None  # profiler start/stop, not the step
    if "SparseEncode" in chain and not any("Backward" in n for n in chain) and any(n in GEMM_OPS for n in chain):
        return "encode GEMM"
    for phase, markers in PHASES:
        if any(m in name for m in markers for name in chain):
            return phase
    return "other"


def profile_phases(trainer, batches: list[torch.Tensor]) -> dict:
    from torch.profiler import profile

    with profile(with_stack=True) as prof:
        for x in batches:
            trainer.train_step(x)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        phase = phase_of(event)
        if phase is not None:
            totals[phase] += event.self_cpu_time_total / 1e3 / len(batches)
    step_ms = sum(totals.values())
    ordered = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"profiled_step_ms": round(step_ms, 1),
            "phases_ms": {k: round(v, 1) for k, v in ordered},
            "phases_share": {k: round(v / step_ms, 3) for k, v in ordered}}


# -- main ------------------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    n_train = args.warmup + args.steps + args.profile_steps
    x_all, data_info = load_data(args, n_train * args.batch_size + args.eval_tokens)
    d = x_all.shape[1]
    batches = list(x_all[: n_train * args.batch_size].split(args.batch_size))
    x_eval = x_all[n_train * args.batch_size:]
    log(f"data: {tuple(x_all.shape)} from {data_info['source']}; load average {os.getloadavg()}")

    # One trainer per path, from the same initial SAE, on the same batches.
    trainers = {}
    for path in args.paths:
        torch.manual_seed(args.seed)
        model = sae.create(sae.SAEConfig(architecture="topk", d_in=d, n_latents=args.n_latents, k=args.k,
                                         kernel_backend=PATHS[path]))
        trainers[path] = sae.Trainer(model, sae.TrainConfig(
            steps=n_train, warmup_steps=0, decay_fraction=0.0, dead_tokens=args.dead_tokens, seed=args.seed))

    # The bound: the encoder's forward GEMM alone, on the SAE's encoder weights (as the
    # encoder reads them: a transposed view), into a preallocated output.
    gemm_x = batches[0].clone()
    gemm_out = torch.empty(args.batch_size, args.n_latents)
    first = next(iter(trainers.values())).model

    def gemm():
        torch.mm(gemm_x, first.W_enc.detach().t(), out=gemm_out)

    load_start = os.getloadavg()
    for x in batches[: args.warmup]:
        for trainer in trainers.values():
            trainer.train_step(x)
        gemm()
    gemm_s, step_s = [], {path: [] for path in trainers}
    for i, x in enumerate(batches[args.warmup: args.warmup + args.steps]):
        for path, trainer in trainers.items():  # alternate, so that all see the same load
            gemm_s.append(timed(gemm, args.clock))
            step_s[path].append(timed(lambda: trainer.train_step(x), args.clock))
        log(f"step {i + 1}/{args.steps}: gemm {gemm_s[-1] * 1e3:.0f} ms, "
            + ", ".join(f"{path} {times[-1] * 1e3:.0f} ms" for path, times in step_s.items()))
    load_end = os.getloadavg()

    gemm_med = statistics.median(gemm_s)
    result = {
        "benchmark": "gemm_bound: TopK SAE training step vs its encoder forward GEMM, same process",
        "config": {"batch_size": args.batch_size, "d_in": d, "n_latents": args.n_latents, "k": args.k,
                   "threads": args.threads, "clock": args.clock, "warmup_steps": args.warmup, "timed_steps": args.steps,
                   "profile_steps": args.profile_steps, "dead_tokens": args.dead_tokens, "seed": args.seed,
                   "lr": next(iter(trainers.values())).lr, "lr_schedule": "constant", "data": data_info, "torch": torch.__version__},
        "load_average": {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in load_end],
                         "cpu_count": os.cpu_count()},
        "gemm_ms_median": round(gemm_med * 1e3, 1),
        "gemm_ms": [round(t * 1e3, 1) for t in gemm_s],
        "gemm_gflop_per_s": round(2 * args.batch_size * d * args.n_latents / gemm_med / 1e9, 1),
        "gemm_bound_tokens_per_s": round(args.batch_size / gemm_med),
        "heldout_tokens": int(x_eval.shape[0]),
    }
    for path, trainer in trainers.items():
        model = trainer.model
        model.eval()
        with torch.no_grad():
            x_hat = model(x_eval)
            fvu_heldout = float((x_eval - x_hat).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
        model.train()
        train_fvu = trainer.metrics().get("fvu")
        step_med = statistics.median(step_s[path])
        result[path] = {
            "step_ms_median": round(step_med * 1e3, 1),
            "step_ms": [round(t * 1e3, 1) for t in step_s[path]],
            "tokens_per_s": round(args.steps * args.batch_size / sum(step_s[path])),
            "fraction_of_gemm_bound": round(gemm_med / step_med, 3),
            "fvu_heldout": round(fvu_heldout, 5),
            "train_fvu_mean": None if train_fvu is None else round(train_fvu, 5),
            **(profile_phases(trainer, batches[args.warmup + args.steps:]) if args.profile_steps else {}),
        }
    if len(trainers) == 2:
        a, b = (result[path] for path in trainers)
        result["speedup"] = round(b["step_ms_median"] / a["step_ms_median"], 3)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (data-dependent init, allocator)")
    p.add_argument("--profile-steps", type=int, default=2, help="extra steps under torch.profiler (0: none)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-latents", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-in", type=int, default=576, help="width of synthetic data (a cache sets its own)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (with --threads 1, robust on a busy machine)")
    p.add_argument("--dead-tokens", type=int, default=sae.TrainConfig.dead_tokens,
                   help="tokens without firing before a latent is dead and gets AuxK (small: AuxK runs every step)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for the FVU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/work/data/cache-l15", help="activation cache folder (sae cache ...)")
    p.add_argument("--synthetic", action="store_true", help="synthetic activations even if the cache exists")
    p.add_argument("--quick", action="store_true", help="tiny shapes, synthetic data (a smoke test)")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                   help="training paths to time in the same run (speedup: the second's step time over the first's)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.n_latents, args.k, args.d_in, args.steps = 256, 512, 8, 64, 3
        args.eval_tokens, args.synthetic = 256, True
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
