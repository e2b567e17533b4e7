"""Peak memory of a long `sae train` run (goal: 1M tokens in < 4 GiB peak RSS); prints one JSON object.

Runs the real CLI (`python -m sae train`) in a subprocess with the main job's SAE at full width
(SmolLM2 layer 15 resid_post, 16x expansion = 9216 latents, k 32, batch 4096, W&B offline), from
the live model and/or from a `sae cache` folder, and reports per run:

- `peak_rss_mib`: the trainer process's peak RSS (exact: the kernel's high-water mark from wait4);
- `peak_rss_tree_mib`: the peak of the summed RSS of its whole process tree (W&B's service
  included), polled every `--interval` seconds;
- `peak_by_phase_mib`: the tree's polled peak before the first step (model load, buffer fill),
  during training, and after the last step (final CE/KL evaluation, checkpoint, W&B finish);
- `flatness`: the polled peak during the log interval that ends at step `2 x --log-every` vs
  during the last log interval, and the least-squares slope of per-interval peaks in MiB per
  100k tokens (0 when nothing grows with the run's length);
- wall time, tokens/s over the wall time and the trainer's own tokens/s.

    python benchmarks/memory.py                                  # 1M tokens from the live model
    python benchmarks/memory.py --tokens 200000 --source both    # quick: live model and a cache
    python benchmarks/memory.py --source cache --cache /path/to/cache   # an existing `sae cache` folder

`--source cache` without `--cache` harvests one of `--cache-tokens` (default: `--tokens`) into a
temporary folder under `--workdir` with `sae cache` (~2.3 GB per 1M fp32 tokens; its peak RSS is
reported too) and deletes it afterwards. A cache smaller than the run is read for several epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import atomicfs  # noqa: E402

MIB = 1024 * 1024
STEP_LINE = re.compile(r"^step (\d+):.*?\btokens_per_s=([0-9.e+-]+)")


def _rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """The process and all its descendants (from /proc/<pid>/task/*/children)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


class TreeSampler(threading.Thread):
    """Polls the summed RSS of a process tree; keeps (seconds since start, bytes) samples."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.start_time = pid, interval, time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = sum(_rss_bytes(p) for p in _tree(self.pid))
            if total:
                self.samples.append((time.perf_counter() - self.start_time, total))
            self.done.wait(self.interval)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        inside = [b for t, b in self.samples if start <= t <= end]
        return round(max(inside) / MIB, 1) if inside else None


def measure(cmd: list[str], interval: float, echo: bool, batch_size: int | None = None) -> dict:
    """Run `cmd`, sampling its memory; parse `step N: ... tokens_per_s=...` lines from its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    sampler = TreeSampler(proc.pid, interval)
    sampler.start_time = start
    sampler.start()
    steps: list[tuple[int, float]] = []  # (step, seconds since start) of each logged step
    trainer_rate = None
    for line in proc.stdout:
        if echo:
            sys.stderr.write(line)
        if match := STEP_LINE.match(line):
            steps.append((int(match[1]), time.perf_counter() - start))
            trainer_rate = float(match[2])
    # wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux), exact between polls too.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    result = {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "peak_rss_tree_mib": sampler.peak(),
        "trainer_tokens_per_s": trainer_rate,
    }
    if steps:
        result["peak_by_phase_mib"] = {
            "setup": sampler.peak(0, steps[0][1]),
            "training": sampler.peak(steps[0][1], steps[-1][1]),
            "final": sampler.peak(steps[-1][1]),
        }
        result["flatness"] = flatness(steps, sampler, batch_size)
    return result


def flatness(steps: list[tuple[int, float]], sampler: TreeSampler, batch_size: int | None) -> dict | None:
    """Peak RSS per log interval: the second interval (steps past warm-up) vs the last one, and
    the slope over all intervals after the first."""
    intervals = [
        (steps[i][0], steps[i + 1][0], sampler.peak(steps[i][1], steps[i + 1][1])) for i in range(len(steps) - 1)
    ]
    intervals = [iv for iv in intervals if iv[2] is not None]
    if len(intervals) < 2:
        return None
    (s0, s1, early), (l0, l1, late) = intervals[0], intervals[-1]
    out = {
        "early_steps": [s0, s1], "early_peak_mib": early, "late_steps": [l0, l1], "late_peak_mib": late,
        "growth_mib": round(late - early, 1),
    }
    if len(intervals) >= 3 and batch_size:
        xs = [(a + b) / 2 * batch_size for a, b, _ in intervals]
        ys = [p for _, _, p in intervals]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out["slope_mib_per_100k_tokens"] = round(slope * 100_000, 2)
    return out


def train_command(args: argparse.Namespace, out_dir: Path, cache: str | None) -> list[str]:
    cmd = [
        sys.executable, "-m", "sae", "train", "--sites", args.site, "--n-tokens", str(args.tokens),
        "--batch-size", str(args.batch_size), "--expansion-factor", str(args.expansion_factor), "--k", str(args.k),
        "--log-every", str(args.log_every), "--wandb-mode", args.wandb_mode, "--out-dir", str(out_dir),
        "--run-name", out_dir.name,
    ]
    return cmd + (["--activations", cache] if cache else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    parser.add_argument("--source", choices=("model", "cache", "both"), default="model",
                        help="train from the live model, from a cache folder, or both (one run each)")
    parser.add_argument("--cache", default=None, help="an existing `sae cache` folder (default: harvest one)")
    parser.add_argument("--cache-tokens", type=int, default=None, help="tokens to harvest into the temporary cache")
    parser.add_argument("--site", default="blocks.15.hook_resid_post")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion-factor", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged interval (the flatness check's unit)")
    parser.add_argument("--wandb-mode", default="offline")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between RSS polls")
    parser.add_argument("--target-gib", type=float, default=4.0)
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where run folders and caches go (deleted after)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' stdout to stderr")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sae-memory-", dir=args.workdir))
    runs: dict[str, dict] = {}
    cache_build = None
    try:
        if args.source in ("model", "both"):
            runs["model"] = measure(train_command(args, work / "run-model", None), args.interval, not args.quiet, args.batch_size)
        if args.source in ("cache", "both"):
            cache = args.cache
            if cache is None:
                cache = str(work / "cache")
                cache_tokens = args.cache_tokens or args.tokens
                cache_build = measure(
                    [sys.executable, "-m", "sae", "cache", "--sites", args.site, "--tokens", str(cache_tokens), "--out", cache],
                    args.interval, not args.quiet,
                )
                cache_build["n_tokens"] = cache_tokens
            runs["cache"] = measure(train_command(args, work / "run-cache", cache), args.interval, not args.quiet, args.batch_size)
            runs["cache"]["cache"] = cache
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for run in runs.values():
        run["n_tokens"] = args.tokens
        run["tokens_per_s_wall"] = round(args.tokens / run["wall_s"], 1)
    target_mib = args.target_gib * 1024
    result = {
        "benchmark": "memory",
        "settings": {k: getattr(args, k) for k in ("tokens", "site", "batch_size", "expansion_factor", "k", "log_every",
                                                    "wandb_mode", "interval")},
        "target_gib": args.target_gib,
        "runs": runs,
        "cache_build": cache_build,
        "meets_target": all(r["returncode"] == 0 and (r["peak_rss_tree_mib"] or 0) < target_mib
                            and r["peak_rss_mib"] < target_mib for r in runs.values()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_1m": os.getloadavg()[0]},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        atomicfs.write_json(args.out, result)
    print(text)


if __name__ == "__main__":
    main()
