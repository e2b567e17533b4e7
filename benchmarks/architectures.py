"""Every registered architecture trained on the same real-model activations, side by side.

Trains one SAE per architecture (same width, k, batches, learning rate and seed) on a `sae cache`
folder, then evaluates each with `analysis.evaluate` on held-out text through the live model:
FVU, L0, dead fraction (over the evaluation tokens), CE-loss score, plus training tokens/s and
encoder parameters. Prints JSON (progress on stderr).

    sae cache --sites blocks.15.hook_resid_post --tokens 100000 --out cache-l15   # once
    python benchmarks/architectures.py --cache cache-l15 [--latents 4608 --k 32 --tokens 65536]

Transcoders predict --site from another cached site (--transcoder-input), so they sit beside the
SAEs of the same site: same FVU target and the same site spliced for the CE-loss score.

    sae cache --sites blocks.15.mlp.hook_in blocks.15.hook_mlp_out --tokens 70000 --out cache-mlp15
    python benchmarks/architectures.py --cache cache-mlp15 --site blocks.15.hook_mlp_out \
        --transcoder-input blocks.15.mlp.hook_in --architectures topk transcoder skip_transcoder
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import activations
import analysis
import sae

ENCODER_PARAMS = ("W_enc", "b_enc", "W_p", "b_p", "W_q", "b_q", "complexity_w", "complexity_b")


def train(arch: str, batches: list, args: argparse.Namespace, d_in: int) -> tuple[sae.BaseSAE, float]:
    torch.manual_seed(args.seed)
    cfg = sae.SAEConfig(architecture=arch, d_in=d_in, n_latents=args.latents, k=args.k)
    model = sae.create(cfg)
    train_cfg = sae.TrainConfig(lr=args.lr, warmup_steps=min(100, len(batches) // 10), log_every=10**9, seed=args.seed,
                                dead_tokens=args.dead_tokens)
    trainer = sae.Trainer(model, train_cfg)
    start = time.perf_counter()
    trainer.fit(batches, progress=False)
    return model, len(batches) * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a `sae cache` folder (its model is loaded for the CE score)")
    parser.add_argument("--site", default=None, help="cached site to use (default: the cache's first)")
    parser.add_argument("--transcoder-input", default=None,
                        help="cached site the transcoders read to predict --site (without it they are skipped)")
    parser.add_argument("--architectures", nargs="+", default=list(sae.architectures()))
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens per architecture")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=None, help="Adam LR (default: the trainer's width rule)")
    parser.add_argument("--dead-tokens", type=int, default=50_000)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cache = activations.CachedActivations(args.cache)
    site = args.site or cache.sites[0]
    n_batches = args.tokens // args.batch_size
    if n_batches < 1 or n_batches * args.batch_size > cache.n_tokens:
        raise SystemExit(f"error: --tokens must be between --batch-size and the cache's {cache.n_tokens} tokens")
    sites = [site] + ([args.transcoder_input] if args.transcoder_input else [])
    stream = cache.batch_dicts(args.batch_size, sites=sites, seed=args.seed, drop_last=True)
    batches = [next(stream) for _ in range(n_batches)]
    lm = activations.load_model(cache.model)

    results = {}
    for arch in args.architectures:
        transcoder = sae.registry.get(arch).predicts_target
        if transcoder and not args.transcoder_input:
            print(f"skipping {arch}: a transcoder needs --transcoder-input", file=sys.stderr, flush=True)
            continue
        print(f"training {arch} ...", file=sys.stderr, flush=True)
        inputs = [(b[args.transcoder_input], b[site]) if transcoder else b[site] for b in batches]
        model, tokens_per_s = train(arch, inputs, args, cache.d)
        report = analysis.evaluate(model, lm, args.transcoder_input if transcoder else site, n_tokens=args.eval_tokens,
                                   absorption=False, probing=False, contrastive=False,
                                   target_site=site if transcoder else None)
        results[arch] = {
            "fvu": round(report["fvu"], 4),
            "l0": round(report["l0"], 2),
            "dead_fraction": round(report["dead_fraction"], 4),
            "ce_loss_score": round(report["ce_loss_score"], 4),
            "train_tokens_per_s": round(tokens_per_s),
            "encoder_params": sum(p.numel() for name, p in model.named_parameters() if name in ENCODER_PARAMS),
        }
        print(f"{arch}: {results[arch]}", file=sys.stderr, flush=True)
    config = {**vars(args), "site": site, "model": cache.model, "train_tokens": n_batches * args.batch_size}
    print(json.dumps({"config": config, "results": results}, indent=2))


if __name__ == "__main__":
    main()
