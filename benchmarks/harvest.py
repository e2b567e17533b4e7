"""Benchmark activation harvesting on the default model; prints one JSON object.

Compares, in tokens per second (median of `--repeats` after a warm-up):

- `full_forward`: the whole model with logits (what a harvester that reads
  `output_hidden_states` pays);
- `one_site`: `activations.harvest` of one middle-layer site, which stops after that layer
  (goal: >= 1.8x `full_forward`);
- `n_sites_one_pass` vs `n_sites_n_passes`: N sites spread over the layers, harvested
  together in one forward vs one harvest per site.

    python benchmarks/harvest.py                          # CPU, small batch (~1-2 min)
    python benchmarks/harvest.py --device cuda --batch-size 64 --context-len 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import activations

GOAL_SPEEDUP = 1.8


def _timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up call each. Calls are
    interleaved round-robin so load changes on a shared machine hit all of them alike."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id/path (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    parser.add_argument("--context-len", type=int, default=64)
    parser.add_argument("--n-sites", type=int, default=4, help="sites for the one-pass vs N-passes comparison")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    lm = activations.load_model(args.model, device=args.device)
    texts = activations.default_texts(limit=400)
    ids = activations.token_windows(lm.tokenizer, texts, args.context_len)[: args.batch_size].to(lm.device)
    if len(ids) < args.batch_size:
        raise SystemExit(f"not enough text for {args.batch_size} windows of {args.context_len} tokens")
    n_tok = ids.numel()
    middle = f"blocks.{lm.n_layers // 2}.hook_resid_post"
    # N sites evenly spread over the layers, the deepest at 3/4 depth (typical SAE training sites).
    layers = [round((i + 1) * 0.75 * lm.n_layers / args.n_sites) - 1 for i in range(args.n_sites)]
    sites = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    device = lm.device

    def full() -> object:
        return lm.model(input_ids=ids, use_cache=False).logits

    t = _timed({
        "full": full,
        "one": lambda: activations.harvest(lm, ids, middle),
        "multi": lambda: activations.harvest(lm, ids, sites),
        "passes": lambda: [activations.harvest(lm, ids, s) for s in sites],
    }, args.repeats, device)
    t_full, t_one, t_multi, t_passes = t["full"], t["one"], t["multi"], t["passes"]

    print(json.dumps({
        "benchmark": "harvest",
        "model": lm.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "tokens_per_forward": n_tok,
        "full_forward_tok_s": round(n_tok / t_full, 1),
        "one_site": middle,
        "one_site_tok_s": round(n_tok / t_one, 1),
        "one_site_speedup": round(t_full / t_one, 3),
        "goal_speedup": GOAL_SPEEDUP,
        "meets_goal": t_full / t_one >= GOAL_SPEEDUP,
        "n_sites": sites,
        "n_sites_one_pass_tok_s": round(n_tok / t_multi, 1),
        "n_sites_n_passes_tok_s": round(n_tok / t_passes, 1),
        "one_pass_speedup": round(t_passes / t_multi, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
