"""Which training text carries over to other text: TopK SAEs trained on the stdlib docstrings, on
self-generated text (FaithfulSAE) and on a 50/50 mix, each evaluated on the held-out documents
of both corpora and on text neither holds (the installed packages' README descriptions).
A corpus smaller than --n-tokens is repeated (harvested once, then cycled in training).

Prints one JSON object: per data choice, FVU (all tokens, and without the few massive-norm
tokens that dominate it) and L0 per eval text, the CE-loss score on the
out-of-domain text, and the dead / rarely firing latents over all eval tokens. Activations are
harvested once per text (the mix takes half of each source's train-split tokens, like
`--texts docstrings:0.5 selfgen:0.5`) and kept in --work-dir, so a rerun reuses them.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/text_sources.py --work-dir /tmp/text-sources
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import activations
import analysis.downstream as downstream
import sae
from analysis.metrics import ReconstructionStats


def harvested(path: Path, make) -> dict[str, torch.Tensor]:
    if not path.is_file():
        save_file(make(), str(path))
    return load_file(str(path))


def stream_rows(lm, site: str, texts, split: str, n_tokens: int | None) -> torch.Tensor:
    """Activations of the `split` documents: `n_tokens` of them, or one pass when None."""
    batches = activations.stream(lm, site, texts=texts, split=split, n_tokens=n_tokens, batch_size=1024, progress=True)
    return torch.cat([b[site] for b in batches])


def eval_windows(lm, texts, split: str, n_tokens: int) -> torch.Tensor:
    docs = activations.select_split(texts, split)
    windows = activations.token_windows(lm.tokenizer, docs, 128)
    return windows[: max(1, n_tokens // 128)]


def train_sae(x: torch.Tensor, args, seed: int = 0) -> sae.TopKSAE:
    torch.manual_seed(seed)
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=x.shape[1], n_latents=args.n_latents, k=args.k))
    steps = args.n_tokens // args.batch_size
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(-(-args.n_tokens // len(x)))])
    batches = (x[order[i * args.batch_size : (i + 1) * args.batch_size]] for i in range(steps))
    cfg = sae.TrainConfig(lr=args.lr, steps=steps, warmup_steps=args.warmup_steps, log_every=10**9, seed=seed)
    sae.Trainer(model, cfg).fit(batches)
    return model.eval()


def typical(x: torch.Tensor) -> torch.Tensor:
    """Rows without a massive activation (norm above 10x the median; in SmolLM2 some tokens right
    after BOS reach ~100x, and those few rows hold most of the variance, so the plain FVU is
    mostly about them)."""
    norms = x.norm(dim=-1)
    return norms <= 10 * norms.median()


@torch.no_grad()
def reconstruction(model, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """FVU over all rows and over the typical ones, L0, and how often each latent fired."""
    stats, typical_stats = (ReconstructionStats(model.cfg.d_in, model.cfg.n_latents) for _ in range(2))
    for chunk in x.split(1024):
        z = model.encode(chunk)
        x_hat, keep = model.decode(z), typical(chunk)
        stats.update(chunk, x_hat, z)
        typical_stats.update(chunk[keep], x_hat[keep], z[keep])
    return {**stats.result(), "fvu_typical": typical_stats.result()["fvu"]}, stats.fire_counts


@torch.no_grad()
def ce_scores(models: dict, lm, site: str, windows: torch.Tensor) -> dict[str, dict[str, float]]:
    """CE-loss / KL scores of each SAE, sharing the clean and zero-ablated forwards."""
    sums = {name: {} for name in models}
    for ids in windows.split(8):
        keep = activations.token_mask(lm, ids)
        scored, targets = keep[:, :-1] & keep[:, 1:], ids[:, 1:, None]
        clean = downstream._next_token_logprobs(activations.logits(lm, ids))

        def patched(fn):
            with activations.patch_site(lm, site, fn):
                out = downstream._next_token_logprobs(activations.logits(lm, ids))
            return float(-out.gather(-1, targets)[..., 0][scored].sum()), float((clean.exp() * (clean - out)).sum(-1)[scored].sum())

        ce_zero, kl_zero = patched(downstream.zero_splice(keep))
        base = {"n_positions": float(scored.sum()), "ce_clean": float(-clean.gather(-1, targets)[..., 0][scored].sum()),
                "ce_zero": ce_zero, "kl_zero": kl_zero}
        for name, model in models.items():
            ce_sae, kl_sae = patched(downstream.sae_splice(model, keep))
            for key, value in {**base, "ce_sae": ce_sae, "kl_sae": kl_sae}.items():
                sums[name][key] = sums[name].get(key, 0.0) + value
    return {name: downstream.downstream_scores(s) for name, s in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", required=True, help="harvested activations and SAEs (reused by reruns)")
    p.add_argument("--n-tokens", type=int, default=60_000, help="training tokens per SAE")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens per eval text")
    p.add_argument("--ce-tokens", type=int, default=2048, help="out-of-domain tokens for the CE-loss score")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--rare-density", type=float, default=1e-4, help="a latent firing on fewer tokens than this is rare")
    p.add_argument("--selfgen", default="selfgen", help="the self-generated corpus: selfgen (shipped) or a .jsonl file")
    p.add_argument("--docstrings-cache", help="a `sae cache` folder of docstring activations at the site (skips harvesting)")
    p.add_argument("--only", nargs="+", help="data choices to run (default: docstrings selfgen mix)")
    p.add_argument("--seed", type=int, default=0, help="SAE initialisation and batch order")
    p.add_argument("--prepare", action="store_true", help="only harvest and train what needs no self-generated text")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    site = f"blocks.{args.layer}.hook_resid_post"
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    lm = activations.load_model()
    docstrings = activations.named_texts("docstrings")
    selfgen = [] if args.prepare else activations.named_texts(args.selfgen)

    def docstring_rows() -> dict[str, torch.Tensor]:
        if args.docstrings_cache:
            cache = activations.CachedActivations(args.docstrings_cache)
            return {"x": torch.cat([b[site] for b in cache.batch_dicts(4096, sites=[site], seed=0)])[: args.n_tokens]}
        return {"x": stream_rows(lm, site, docstrings, "train", args.n_tokens)}

    train_rows = {
        "docstrings": lambda: harvested(work / "train_docstrings.safetensors", docstring_rows)["x"],
        "selfgen": lambda: harvested(
            work / "train_selfgen.safetensors", lambda: {"x": stream_rows(lm, site, selfgen, "train", None)})["x"],
    }
    eval_texts = {"docstrings": (docstrings, "heldout"), "selfgen": (selfgen, "heldout"),
                  "packages": (activations.package_descriptions(), "all")}
    if args.prepare:
        del eval_texts["selfgen"]
    eval_ids = {name: eval_windows(lm, texts, split, args.eval_tokens) for name, (texts, split) in eval_texts.items()}
    eval_rows = {}
    for name, ids in eval_ids.items():
        def rows(ids=ids):
            keep = activations.token_mask(lm, ids)
            return {"x": torch.cat([activations.harvest(lm, b, site)[site][k] for b, k in zip(ids.split(8), keep.split(8))])}
        eval_rows[name] = harvested(work / f"eval_{name}.safetensors", rows)["x"]

    models = {}
    for choice in args.only or ["docstrings", "selfgen", "mix"]:
        path = work / (f"sae_{choice}" + (f"_seed{args.seed}" if args.seed else ""))
        if not (path / "sae.safetensors").is_file():
            if choice == "mix":
                half = args.n_tokens // 2
                own = train_rows["selfgen"]()  # repeated as the window mix repeats a small source
                x = torch.cat([train_rows["docstrings"]()[:half], own[torch.arange(half) % len(own)]])
            else:
                x = train_rows[choice]()
            train_sae(x, args, args.seed).save(path)
        models[choice] = sae.load(path)
    if args.prepare:
        return
    results = {}
    for choice, model in models.items():
        row, fired, tokens = {}, torch.zeros(args.n_latents, dtype=torch.float64), 0
        for name, x in eval_rows.items():
            metrics, counts = reconstruction(model, x)
            row[f"fvu_{name}"], row[f"fvu_typical_{name}"] = metrics["fvu"], metrics["fvu_typical"]
            row[f"l0_{name}"] = metrics["l0"]
            fired, tokens = fired + counts, tokens + len(x)
        row["dead_fraction"] = float((fired == 0).double().mean())
        row[f"rare_fraction_below_{args.rare_density:g}"] = float((fired / tokens < args.rare_density).double().mean())
        results[choice] = row
    ce_windows = eval_ids["packages"][: max(1, args.ce_tokens // 128)]
    for choice, scores in ce_scores(models, lm, site, ce_windows).items():
        results[choice].update({f"{k}_packages": v for k, v in scores.items()})
    setup = {k: v for k, v in vars(args).items() if k not in ("only", "work_dir")}
    setup.update(site=site, eval_tokens_kept={name: len(x) for name, x in eval_rows.items()},
                 massive_rows={name: int((~typical(x)).sum()) for name, x in eval_rows.items()})
    print(json.dumps({"setup": setup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
