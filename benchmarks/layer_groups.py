"""Layer-group SAEs vs one SAE per layer, on the same tokens of the default model.

Harvests a range of adjacent resid_post layers in one pass (the same training batches for every
configuration), then trains (a) one TopK SAE per layer and (b) one SAE per layer group, the groups
chosen by `sae train`'s rule (angular similarity on the first batch, exact contiguous grouping),
for each G in --groups and each row mode (all: every member layer's row of each token; one: one
random member's row). Per configuration: training wall and CPU seconds, SAE count, parameters and
training GFLOPs (4·d·n per row: encoder forward + weight gradient); per layer: FVU on held-out
activations and CE-loss / KL score with the SAE spliced in at that layer (clean and zero-ablated
forwards shared by all configurations; checked once against `analysis.evaluate`). Also the
similarity matrix of all layers of the model and its auto groupings. Prints JSON (progress on stderr).

    python benchmarks/layer_groups.py                       # layers 8-15, G = 4 and 2, ~32k tokens
    python benchmarks/layer_groups.py --layers 0-29 --groups 15 8 --tokens 16384
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

import activations
import analysis
import sae
from sae.app import layer_groups


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def harvest_batches(lm, sites: list[str], args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """The training batches, held in memory so every configuration sees the same ones."""
    stream = activations.stream(
        lm, sites, context_len=args.context_len, batch_size=args.batch_size, n_tokens=args.tokens, seed=args.seed,
        progress=True, split="train", drop_last=True,
    )
    return [b for b in stream if len(next(iter(b.values()))) == args.batch_size]


def train_config(batches, groups: dict[str, list[str]], rows: str, args: argparse.Namespace, d: int) -> dict:
    """One SAE per group (a group of one = a per-layer SAE), trained together on one pass of the batches."""
    torch.manual_seed(args.seed)
    trainers = {}
    for name in groups:
        model = sae.create(sae.SAEConfig(architecture="topk", d_in=d, n_latents=args.latents, k=args.k))
        cfg = sae.TrainConfig(warmup_steps=max(1, len(batches) // 10), log_every=10**9, seed=args.seed, steps=len(batches))
        trainers[name] = sae.Trainer(model, cfg, name=name)
    wall, cpu = time.perf_counter(), time.process_time()
    sae.fit_many(trainers, layer_groups.group_batches(iter(batches), groups, rows, args.seed), progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows_seen = {name: t.tokens for name, t in trainers.items()}
    return {
        "models": {name: t.model.eval() for name, t in trainers.items()},
        "groups": groups,
        "rows": rows,
        "n_saes": len(trainers),
        "train_wall_s": round(wall, 2),
        "train_cpu_s": round(cpu, 2),
        "train_rows": sum(rows_seen.values()),
        "train_gflop": round(sum(rows_seen.values()) * 4 * d * args.latents / 1e9, 1),
        "params": sum(p.numel() for t in trainers.values() for p in t.model.parameters()),
    }


def heldout_windows(lm, n_tokens: int, context_len: int) -> torch.Tensor:
    """The held-out windows `analysis.evaluate` reads (same split, same order)."""
    docs = activations.select_split(activations.default_texts(), "heldout", activations.HELDOUT_FRACTION)
    n = max(1, n_tokens // context_len)
    return torch.stack(list(itertools.islice(activations.iter_token_windows(lm.tokenizer, docs, context_len, chunk_docs=1), n)))


def _logprobs(lm, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(activations.logits(lm, ids)[:, :-1].float(), dim=-1)


def _add(sums: dict[str, float], clean: torch.Tensor, patched: dict[str, torch.Tensor], targets, scored) -> None:
    """Accumulate `analysis.downstream_sums`'s sums for one batch from already computed log-probs."""
    terms = {"n_positions": float(scored.sum()), "ce_clean": float(-clean.gather(-1, targets)[..., 0][scored].sum())}
    for name, logprobs in patched.items():
        terms[f"ce_{name}"] = float(-logprobs.gather(-1, targets)[..., 0][scored].sum())
        terms[f"kl_{name}"] = float((clean.exp() * (clean - logprobs)).sum(-1)[scored].sum())
    for key, value in terms.items():
        sums[key] = sums.get(key, 0.0) + value


@torch.no_grad()
def evaluate_all(lm, sites: list[str], configs: dict[str, dict], args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """config -> site -> {fvu, l0, ce_loss_score, kl_score, delta_ce}: FVU/L0 on --fvu-tokens held-out
    tokens; CE/KL on the first --ce-tokens of them, sharing the clean and zero-ablated forwards."""
    windows = heldout_windows(lm, args.fvu_tokens, args.context_len)
    ce_windows = max(1, args.ce_tokens // args.context_len)
    keys = [(c, s) for c in configs for s in sites]
    stats = {key: analysis.ReconstructionStats(lm.d_model, args.latents) for key in keys}
    sums = {key: {} for key in keys}
    owner = {c: {s: next(n for n, m in cfg["groups"].items() if s in m) for s in sites} for c, cfg in configs.items()}
    done = 0
    for ids in windows.split(8):
        keep = activations.token_mask(lm, ids)
        acts = activations.harvest(lm, ids, sites)
        for c, s in keys:
            model = configs[c]["models"][owner[c][s]]
            x = acts[s][keep]
            z = model.encode(x)
            stats[c, s].update(x, model.decode(z), z)
        if done < ce_windows:
            ids, keep = ids[: ce_windows - done], keep[: ce_windows - done]
            scored = keep[:, :-1] & keep[:, 1:]
            targets = ids[:, 1:, None]
            clean = _logprobs(lm, ids)

            for s in sites:
                log(f"  CE/KL at {s} ({len(ids)} windows)")
                with activations.patch_site(lm, s, analysis.zero_splice(keep)):
                    zero = _logprobs(lm, ids)
                for c in configs:
                    with activations.patch_site(lm, s, analysis.sae_splice(configs[c]["models"][owner[c][s]], keep)):
                        spliced = _logprobs(lm, ids)
                    _add(sums[c, s], clean, {"sae": spliced, "zero": zero}, targets, scored)
            done += len(ids)
    out: dict[str, dict[str, dict]] = {c: {} for c in configs}
    for c, s in keys:
        result = stats[c, s].result()
        scores = analysis.downstream_scores(sums[c, s])
        out[c][s] = {
            "fvu": round(result["fvu"], 4), "l0": round(result["l0"], 1),
            **{k: round(scores[k], 4) for k in ("ce_loss_score", "kl_score", "delta_ce")},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="8-15", help="adjacent layers to train on")
    parser.add_argument("--groups", type=int, nargs="+", default=None, help="group counts G (default: L/2 and L/4)")
    parser.add_argument("--rows", nargs="+", default=["all", "one"], choices=layer_groups.ROW_MODES)
    parser.add_argument("--latents", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens (the same for every configuration)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--fvu-tokens", type=int, default=4096, help="held-out tokens for FVU / L0")
    parser.add_argument("--ce-tokens", type=int, default=512, help="held-out tokens for CE-loss / KL scores")
    parser.add_argument("--similarity-tokens", type=int, default=1024, help="tokens for the all-layer similarity matrix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = activations.load_model()
    layers = layer_groups.parse_layers(args.layers)
    sites = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    group_counts = args.groups or sorted({max(1, len(layers) // 2), max(1, len(layers) // 4)}, reverse=True)
    result: dict = {"model": lm.name, "layers": layers, "latents": args.latents, "k": args.k, "tokens": args.tokens,
                    "batch_size": args.batch_size, "threads": args.threads}

    log(f"similarity of all {lm.n_layers} layers on {args.similarity_tokens} tokens")
    start = time.perf_counter()
    all_sites = [f"blocks.{layer}.hook_resid_post" for layer in range(lm.n_layers)]
    similarity = analysis.layer_similarity(lm, all_sites, n_tokens=args.similarity_tokens, seed=args.seed)
    result["all_layers"] = {
        "similarity_s": round(time.perf_counter() - start, 1),
        "similarity": [[round(v, 4) for v in row] for row in similarity.tolist()],
        "auto_groups": {
            str(g): [[group[0], group[-1]] for group in analysis.group_layers(similarity, g)] for g in (2, 4, 8, 15)
            if g <= lm.n_layers
        },
    }

    log(f"harvesting {args.tokens} training tokens at layers {args.layers}")
    start = time.perf_counter()
    batches = harvest_batches(lm, sites, args)
    result["harvest_s"] = round(time.perf_counter() - start, 1)
    result["steps"] = len(batches)

    plans = {"per_layer": ({s: [s] for s in sites}, "all", None)}
    for g in group_counts:
        grouping = layer_groups.choose_groups(batches[0], f"auto:{g}")
        for rows in args.rows:
            plans[f"G{g}_{rows}"] = (grouping.groups, rows, grouping)
    result["chosen"] = {
        name: {"groups": grouping.spec, "amad": round(grouping.record["amad"], 4)}
        for name, (_, _, grouping) in plans.items() if grouping is not None
    }
    first = analysis.angular_similarity({s: batches[0][s] for s in sites})
    result["similarity"] = [[round(v, 4) for v in row] for row in first.tolist()]  # what the groups were chosen from

    configs = {}
    for name, (groups, rows, _) in plans.items():
        log(f"training {name}: {len(groups)} SAEs, rows={rows}")
        configs[name] = train_config(batches, groups, rows, args, lm.d_model)
    log("evaluating")
    start = time.perf_counter()
    per_layer = evaluate_all(lm, sites, configs, args)
    result["eval_s"] = round(time.perf_counter() - start, 1)

    # The shared-forward evaluation must agree with analysis.evaluate (checked on one SAE and site).
    check = analysis.evaluate(configs["per_layer"]["models"][sites[0]], lm, sites[0], n_tokens=args.ce_tokens,
                              absorption=False, probing=False, contrastive=False, progress=False)
    mine = evaluate_all(lm, sites[:1], {"per_layer": configs["per_layer"]},
                        argparse.Namespace(**{**vars(args), "fvu_tokens": args.ce_tokens}))["per_layer"][sites[0]]
    result["evaluate_check"] = {"analysis.evaluate": {k: round(check[k], 4) for k in ("fvu", "ce_loss_score")},
                                "this script": {k: mine[k] for k in ("fvu", "ce_loss_score")}}

    base = configs["per_layer"]
    result["configs"] = {}
    for name, cfg in configs.items():
        layers_out = per_layer[name]
        mean = {k: round(sum(v[k] for v in layers_out.values()) / len(layers_out), 4) for k in ("fvu", "ce_loss_score", "kl_score")}
        result["configs"][name] = {
            **{k: cfg[k] for k in ("rows", "n_saes", "train_wall_s", "train_cpu_s", "train_rows", "train_gflop", "params")},
            "groups": [[layers[sites.index(m[0])], layers[sites.index(m[-1])]] for m in cfg["groups"].values()],
            "cpu_vs_per_layer": round(cfg["train_cpu_s"] / base["train_cpu_s"], 3),
            "gflop_vs_per_layer": round(cfg["train_gflop"] / base["train_gflop"], 3),
            "mean": mean,
            "per_layer": layers_out,
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
