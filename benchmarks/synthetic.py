"""Quality and speed of every architecture on synthetic data with a known dictionary.

Prints JSON: per architecture the held-out FVU, L0, fraction of true directions recovered
(max cosine > 0.9) and training tokens/s.
    python benchmarks/synthetic.py [--steps 1500] [--d 64] [--features 256]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import sae
from sae.synthetic import SyntheticData, recovered_fraction


def run(arch: str, args: argparse.Namespace) -> dict:
    data = SyntheticData(d=args.d, n_features=args.features, active=args.active, noise=0.01, seed=0)
    batches = data.batches(args.steps, args.batch_size)
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture=arch, d_in=args.d, n_latents=2 * args.features, k=args.k))
    trainer = sae.Trainer(model, sae.TrainConfig(lr=args.lr, warmup_steps=50, dead_tokens=50_000, log_every=10**9))
    start = time.perf_counter()
    trainer.fit(batches, progress=False)
    seconds = time.perf_counter() - start
    model.eval()
    x = data.sample(8192)
    with torch.no_grad():
        z = model.encode(x)
        x_hat = model.decode(z)
    return {
        "fvu": round(sae.fvu(x, x_hat).item(), 4),
        "l0": round((z != 0).sum(-1).float().mean().item(), 2),
        "recovered_fraction": round(recovered_fraction(model.W_dec.detach(), data.dictionary), 3),
        "train_tokens_per_s": round(args.steps * args.batch_size / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--active", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Transcoders map one site to another: they have their own planted-map tests (tests/test_transcoder.py).
    results = {arch: run(arch, args) for arch in sae.architectures() if not sae.registry.get(arch).predicts_target}
    print(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
