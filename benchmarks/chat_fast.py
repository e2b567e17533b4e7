"""FAST (whole chat samples in order, chat template applied) against the default data, on the
embedded SmolLM2-135M-Instruct.

Trains one TopK SAE per data source with the same token budget, width, k, batch, learning rate and
seed: `default` (shuffled stdlib docstrings packed into windows), `chat_fast` (the built-in chat
set, one conversation per sequence, in order) and `chat_packed` (the same conversations packed
into windows: block training on chat data, the FAST paper's BT(F) baseline). Evaluates each on
held-out conversations (whole, under the template) and on held-out plain text: FVU, CE-loss
score, KL score, L0, dead fraction. Prints JSON (progress on stderr); `--out` also keeps it.

    python benchmarks/chat_fast.py [--tokens 65536 --latents 4608 --k 32 --batch-size 1024 --threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import activations
import analysis
import atomicfs
import sae

SOURCES = {
    "default": {},
    "chat_fast": {"chat": True, "sequential": True},
    "chat_packed": {"chat": True, "sequential": False},
}
KEYS = ("fvu", "ce_loss_score", "kl_score", "delta_ce", "l0", "dead_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="blocks.15.hook_resid_post")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens per SAE")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--context-len", type=int, default=128, help="window length of the default data")
    parser.add_argument("--chat-len", type=int, default=256, help="max tokens per conversation (and chat window)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = activations.load_model()
    results: dict = {"config": vars(args), "runs": {}}
    for name in args.sources:
        source = SOURCES[name]
        context_len = args.chat_len if source else args.context_len
        torch.manual_seed(args.seed)
        model = sae.create(sae.SAEConfig(architecture="topk", d_in=lm.d_model, n_latents=args.latents, k=args.k))
        stream = activations.stream(
            lm, args.site, context_len=context_len, batch_size=args.batch_size, n_tokens=args.tokens, seed=args.seed,
            progress=False, fill_progress=False, **source,
        )
        steps = -(-args.tokens // args.batch_size)
        train_cfg = sae.TrainConfig(lr=args.lr, steps=steps, warmup_steps=steps // 10, log_every=10**9, seed=args.seed)
        trainer = sae.Trainer(model, train_cfg)
        print(f"training {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        trainer.fit((b[args.site] for b in stream), progress=False)
        run = {"train_seconds": round(time.perf_counter() - start, 1), "context_len": context_len}
        for eval_name, chat, eval_len in (("chat_heldout", True, args.chat_len), ("text_heldout", False, args.context_len)):
            print(f"  evaluating on {eval_name} ...", file=sys.stderr, flush=True)
            report = analysis.evaluate(
                model, lm, args.site, n_tokens=args.eval_tokens, chat=chat, context_len=eval_len, absorption=False,
                probing=False, contrastive=False, progress=False,
            )
            run[eval_name] = {k: round(report[k], 4) for k in KEYS} | {"tokens": report["meta"]["text"]["tokens"]}
        results["runs"][name] = run
        print(json.dumps({name: run}), file=sys.stderr, flush=True)
        if args.out:
            atomicfs.write_json(Path(args.out), results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
