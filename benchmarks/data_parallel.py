"""Benchmark `sae train` data parallel (torchrun, 2 CPU processes, gloo) against one process on
the same cache and global batch; prints one JSON object.

All runs train the same TopK SAE on the same batches: one process with `--threads-single`
threads (default: every core), one process with one thread (on a busy shared machine a
multi-threaded process loses much of its time to threads waiting for each other), and `--procs`
ranks with `--threads-rank` threads each (default: the cores split between them). The runs alternate (`--repeats` rounds, back to back), so a load
change on a shared machine hits both alike; each run's rate is its steady state, taken between
the first and last logged step after `--skip-steps` (cache reading, first-batch init and the
Adam warm-up excluded), from the cumulative tokens/s it logs.

    python benchmarks/data_parallel.py --cache /work/data/cache-l15          # ~4 min on 2 cores
    python benchmarks/data_parallel.py --cache CACHE --steps 12 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steady_rate(metrics_file: Path, skip_steps: int) -> float:
    """Tokens/s between the first logged step after `skip_steps` and the last one. Each line's
    tokens_per_s is cumulative since the loop started, so elapsed(step) = tokens / rate."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    logged = [(m["tokens"], m["tokens"] / m["tokens_per_s"]) for m in lines if "tokens_per_s" in m and m["step"] > skip_steps]
    if len(logged) < 2:
        raise SystemExit(f"{metrics_file}: fewer than two logged steps after step {skip_steps}; raise --steps")
    (t0, s0), (t1, s1) = logged[0], logged[-1]
    return (t1 - t0) / (s1 - s0)


def train(args: argparse.Namespace, procs: int, threads: int, out_dir: Path) -> float:
    flags = [
        "train", "--activations", args.cache, "--batch-size", str(args.batch_size),
        "--n-tokens", str(args.steps * args.batch_size), "--expansion-factor", str(args.expansion_factor),
        "--k", str(args.k), "--no-wandb", "--device", "cpu", "--log-every", str(args.log_every), "--out-dir", str(out_dir),
    ]
    launcher = [sys.executable, "-m", "sae"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "sae"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(launcher + flags, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{procs}-process run failed:\n{done.stderr[-3000:]}")
    return steady_rate(out_dir / "metrics.jsonl", args.skip_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a `sae cache` folder (or .safetensors activation file)")
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch (split over the ranks)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip-steps", type=int, default=4, help="steps left out of the rate (warm-up)")
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--expansion-factor", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads-single", type=int, default=os.cpu_count())
    parser.add_argument("--threads-rank", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    runs = (
        ("one_process", 1, args.threads_single),
        ("one_process_one_thread", 1, 1),
        ("data_parallel", args.procs, args.threads_rank),
    )
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, procs, threads in runs:
                rates[name].append(train(args, procs, threads, Path(tmp) / f"{name}-{rep}"))
                print(f"round {rep}: {name} {rates[name][-1]:,.0f} tokens/s", file=sys.stderr)
    ratios = {
        f"data_parallel_over_{name}": [dp / one for dp, one in zip(rates["data_parallel"], rates[name])]
        for name in ("one_process", "one_process_one_thread")
    }
    print(json.dumps({
        "cache": args.cache, "batch_size": args.batch_size, "steps": args.steps, "skip_steps": args.skip_steps,
        "n_latents_factor": args.expansion_factor, "k": args.k, "procs": args.procs,
        "threads_single": args.threads_single, "threads_per_rank": args.threads_rank, "cpu_count": os.cpu_count(),
        "tokens_per_s": rates, "ratios": ratios,
        "load_average_start": load_at_start, "load_average_end": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=1))


if __name__ == "__main__":
    main()
