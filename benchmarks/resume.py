"""Resume without replay vs. the old replay, on the default model (live stream, one site).

Runs `sae train` interrupted at step `--interrupt-at` (and, unless `--no-full`, once
uninterrupted), then resumes two copies of the interrupted run: one with its saved stream
position (no replay: windows already harvested are only tokenised again) and one without it
(replay: the model re-runs every batch already trained on, as before). Reports, per resume, the
time from the start of `sae train --resume` to the first new training step, the model's forward
passes until then, and whether the final weights are bit-identical (to the uninterrupted run,
or with --no-full between the two resumes). Prints JSON.

    python benchmarks/resume.py [--n-tokens 61440 --batch-size 1024 --interrupt-at 45 --no-full]
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import sae
from sae.app.cli import main
from sae.app.resume import STREAM_STATE

SITE = "blocks.15.hook_resid_post"
stream_module = importlib.import_module("activations.stream")


def same_weights(a: Path, b: Path) -> bool:
    x, y = sae.load(a / SITE), sae.load(b / SITE)
    return all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for k in x.state_dict())


def timed_resume(run: Path, step: int) -> dict[str, float]:
    """Resume `run`; time and forward passes until the trainer starts the interrupted step (its
    batch may have been saved with the position) and the one after (windows skipped by then)."""
    forwards, reached = [], {}
    harvest, train_step = stream_module.harvest, sae.Trainer.train_step

    def counting_harvest(*args, **kwargs):
        forwards.append(1)
        return harvest(*args, **kwargs)

    def timing_step(self, x):
        if self.step in (step, step + 1) and self.step not in reached:
            reached[self.step] = (time.perf_counter() - started, len(forwards))
        train_step(self, x)

    stream_module.harvest, sae.Trainer.train_step = counting_harvest, timing_step
    try:
        started = time.perf_counter()
        assert main(["train", "--resume", str(run), "--no-wandb"]) == 0
        total = time.perf_counter() - started
    finally:
        stream_module.harvest, sae.Trainer.train_step = harvest, train_step
    return {"seconds_to_interrupted_step": reached[step][0], "forwards_to_interrupted_step": reached[step][1],
            "seconds_to_next_step": reached[step + 1][0], "forwards_to_next_step": reached[step + 1][1],
            "seconds_whole_resume": total}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=61440)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--interrupt-at", type=int, default=45)
    parser.add_argument("--expansion-factor", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-full", action="store_true", help="skip the uninterrupted run (compare the two resumes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    common = ["train", "--sites", SITE, "--n-tokens", str(args.n_tokens), "--batch-size", str(args.batch_size),
              "--expansion-factor", str(args.expansion_factor), "--k", "32", "--no-wandb", "--log-every", "1000"]
    try:
        full_seconds = None
        if not args.no_full:
            print("uninterrupted run", file=sys.stderr)
            started = time.perf_counter()
            assert main([*common, "--out-dir", str(work / "full")]) == 0
            full_seconds = round(time.perf_counter() - started, 2)

        original = sae.Trainer.train_step

        def interrupted(self, x):
            if self.step == args.interrupt_at:
                raise KeyboardInterrupt
            original(self, x)

        sae.Trainer.train_step = interrupted
        try:
            assert main([*common, "--out-dir", str(work / "cut")]) == 130
        finally:
            sae.Trainer.train_step = original
        state_bytes = sum(f.stat().st_size for f in (work / "cut" / STREAM_STATE).iterdir())
        shutil.copytree(work / "cut", work / "replay")
        shutil.rmtree(work / "replay" / STREAM_STATE)
        print("resume without replay", file=sys.stderr)
        new = timed_resume(work / "cut", args.interrupt_at)
        print(f"resume without replay: {new}", file=sys.stderr)
        print("resume by replay (no saved stream position)", file=sys.stderr)
        old = timed_resume(work / "replay", args.interrupt_at)
        if args.no_full:
            identical = {"bit_identical_no_replay_vs_replay": same_weights(work / "replay", work / "cut")}
        else:
            identical = {"bit_identical_no_replay_vs_uninterrupted": same_weights(work / "full", work / "cut"),
                         "bit_identical_replay_vs_uninterrupted": same_weights(work / "full", work / "replay")}
        print(json.dumps({
            "model": "SmolLM2-135M-Instruct", "site": SITE, "n_tokens": args.n_tokens, "batch_size": args.batch_size,
            "interrupted_at_step": args.interrupt_at, "threads": args.threads,
            "uninterrupted_run_seconds": full_seconds, "stream_state_bytes": state_bytes,
            "no_replay": new, "replay": old, **identical,
            "speedup_to_interrupted_step": round(old["seconds_to_interrupted_step"] / new["seconds_to_interrupted_step"], 2),
            "speedup_to_next_step": round(old["seconds_to_next_step"] / new["seconds_to_next_step"], 2),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_benchmark()
