"""End-to-end TopK SAE training throughput: this toolkit vs peer libraries, same activations.

Peers: SAELens (``sae-lens``), EleutherAI's sparsify (``eai-sparsify``) and
dictionary_learning (``dictionary-learning``). Every library trains a TopK SAE with the same
shape (d_in 576, ``--n-latents`` 9216, ``--k`` 32), the same fp32 ``[N, d_in]`` activation
tensor (the same batches in the same order), the same batch size, step count, Adam
learning rate (constant, no warm-up), seed and thread count. Each library runs in its own
subprocess, so its peak RSS (``ru_maxrss``) is its own.

Per library the result holds:

- ``tokens_per_s``: ``--steps`` timed steps x batch size / their summed wall time (the first
  ``--warmup`` steps, which include each library's data-dependent initialisation, are run
  but not timed; set-up is not timed either), plus the median step time;
- ``fvu``: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (summed over all dims) on a held-out batch that no
  library trains on, computed here from each library's own encode/decode (not its metric);
- ``peak_rss_mib`` (``ru_maxrss``: whole process, imports + data + training),
  ``rss_before_setup_mib`` (current RSS after imports and loading the data) and
  ``rss_growth_mib`` (their difference: what the SAE, optimiser and training steps added);
- ``roofline_fraction``: tokens/s ÷ (measured GEMM FLOP/s ÷ FLOP per token), with the FLOP
  model ``4·d_in·n_latents`` per token: the encoder's dense x·W_encᵀ forward (2·d·n) and its
  weight gradient (2·d·n), the dense parts a TopK step cannot avoid; the TopK-sparse decoder,
  its gradients and the sparse input gradient are O(k·d) and left out. GEMM FLOP/s is the
  median of a ``[4096, 576] x [576, 9216]`` fp32 matmul at ``--threads`` threads.

``ratios`` gives ours ÷ each peer (tokens/s) and ours ÷ the fastest peer.

How each library is driven (each library's own training step on the same tensors):

- ``ours``: ``sae.Trainer(sae.create(SAEConfig("topk", ...)), TrainConfig(...)).train_step(x)``
  (what ``Trainer.fit`` calls per batch), reconstruction ``model(x)``;
- ``sae-lens``: ``TopKTrainingSAE`` + ``SAETrainer(...).step(x)`` (the public step its
  ``fit`` loop calls; default config, i.e. dense TopK codes, ``use_sparse_activations=False``;
  ``--saelens-sparse`` adds a run with its sparse-COO codes), reconstruction ``sae(x)``;
- ``sparsify``: ``SparseCoder`` trained with the body of its ``Trainer``'s per-layer hook
  (its ``Trainer`` only trains from a live language model, so the loop is reproduced: b_dec
  init to the batch mean, decoder renormalisation, ``forward(x, dead_mask, total_variance)``,
  ``fvu + auxk_alpha·auxk`` backward, parallel-gradient removal, Adam, dead-latent counts).
  On CPU its decoder is the eager ``F.embedding_bag`` path (Triton is CUDA only); its
  ``fit`` sets ``float32_matmul_precision("high")``, which is NOT done here (fp32 for all).
  Its default optimizer is signum; Adam (its ``optimizer="adam"`` choice) is used to match;
- ``dictionary-learning``: ``TopKTrainer(...).update(step, x)``, reconstruction ``ae(x)``.

Data: an activation cache (``--cache``, default /tmp/bench-cache; create it with
``sae cache --sites blocks.15.hook_resid_post --tokens 200000 --out /tmp/bench-cache``); if
there is none, the tokens needed are harvested once from the embedded model; ``--synthetic``
uses random data instead (a smoke test). The tensor is written once (raw float32) and every
subprocess reads the same file.

    /work/bench-venv/bin/python benchmarks/peers.py                  # B=4096, 30 timed steps
    /work/bench-venv/bin/python benchmarks/peers.py --steps 5 --batch-size 1024
    python benchmarks/peers.py --libs ours                          # project venv: ours only

Peers that are not installed, or fail, are recorded with the reason and skipped. Prints one
JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import torch  # noqa: E402

LIBS = ("ours", "sae-lens", "sparsify", "dictionary-learning")
VARIANTS = {"sae-lens-sparse": "sae-lens"}
MODULE = {"ours": "sae", "sae-lens": "sae_lens", "sparsify": "sparsify", "dictionary-learning": "dictionary_learning"}
DIST = {"ours": "sae-toolkit", "sae-lens": "sae-lens", "sparsify": "eai-sparsify",
        "dictionary-learning": "dictionary-learning"}
FLOP_MODEL = ("4 * d_in * n_latents FLOP per token: encoder forward x @ W_enc^T (2*d*n) + encoder weight "
              "gradient (2*d*n); the TopK-sparse decoder, its gradients and the sparse input gradient "
              "(O(k*d)) are left out")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Each library: build(args, d) -> (step(i, x), reconstruct(x), notes)
# ---------------------------------------------------------------------------------------------

def build_ours(args, d):
    import sae

    model = sae.create(sae.SAEConfig(architecture="topk", d_in=d, n_latents=args.n_latents, k=args.k))
    trainer = sae.Trainer(model, sae.TrainConfig(
        lr=args.lr, steps=args.total_steps, warmup_steps=0, decay_fraction=0.0, seed=args.seed))

    def step(i, x):
        trainer.train_step(x)

    def reconstruct(x):
        model.eval()
        return model(x)

    return step, reconstruct, {"entry_point": "sae.Trainer.train_step", "auxk": "k_aux=d/2, coef 1/32, dead after 1M tokens",
                               "grad_clip": trainer.cfg.grad_clip, "input_normalization": "mean norm sqrt(d_in) (internal)",
                               "b_dec_init": trainer.cfg.b_dec_init}


def build_saelens(args, d, sparse=False):
    from sae_lens import SAETrainer, TopKTrainingSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=args.n_latents, k=args.k, dtype="float32", device="cpu",
                                use_sparse_activations=sparse)
    model = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=args.total_steps * args.batch_size,
                            train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr / 10,
                            lr_scheduler_name="constant", lr_warm_up_steps=0, device="cpu", autocast=False)
    trainer = SAETrainer(tcfg, model, data_provider=iter(()))

    def step(i, x):
        trainer.step(x)  # what SAETrainer.fit calls per batch
        trainer.n_training_steps += 1

    def reconstruct(x):
        model.eval()
        return model(x)

    return step, reconstruct, {
        "entry_point": "sae_lens.SAETrainer.step (TopKTrainingSAE)",
        "use_sparse_activations": sparse,
        "decoder": "torch.sparse.mm on COO codes" if sparse else "dense [B, n_latents] codes @ W_dec",
        "normalize_activations": model.cfg.normalize_activations, "grad_clip": 1.0,
        "b_dec_init": "none (SAETrainer has no data-dependent init; b_dec starts at 0)"}


def build_sparsify(args, d):
    import sparsify.utils
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig

    coder = SparseCoder(d, SparseCoderConfig(num_latents=args.n_latents, k=args.k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(coder.parameters(), lr=args.lr)  # sparsify's "adam" choice (no scheduler: constant LR)
    auxk_alpha = 1 / 32
    dead_threshold = TrainConfig.__dataclass_fields__["dead_feature_threshold"].default
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long)

    def step(i, x):
        # the body of sparsify.Trainer.fit's hook + step for one autoencoding SAE, loss_fn="fvu"
        if i == 0:
            coder.b_dec.data = x.mean(0).to(coder.dtype)
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = coder(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(coder.num_latents, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired.add_(x.shape[0])
            since_fired[fired] = 0
        float(out.fvu)  # sparsify logs this every step

    def reconstruct(x):
        return coder(x).sae_out

    return step, reconstruct, {
        "entry_point": "sparsify.SparseCoder forward/backward with sparsify.Trainer's step logic (reproduced)",
        "decoder_impl": getattr(sparsify.utils.decoder_impl, "__name__", str(sparsify.utils.decoder_impl)),
        "optimizer": "torch Adam (sparsify default is signum)", "auxk_alpha": auxk_alpha, "grad_clip": None,
        "b_dec_init": "batch mean"}


def build_dictionary_learning(args, d):
    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(steps=args.total_steps, activation_dim=d, dict_size=args.n_latents, k=args.k,
                          layer=15, lm_name="SmolLM2-135M-Instruct", lr=args.lr, warmup_steps=0,
                          seed=args.seed, device="cpu")

    def step(i, x):
        trainer.update(i, x)

    def reconstruct(x):
        trainer.ae.eval()
        return trainer.ae(x)

    return step, reconstruct, {"entry_point": "dictionary_learning TopKTrainer.update (AutoEncoderTopK)",
                               "decoder": "dense [B, n_latents] codes through nn.Linear", "grad_clip": 1.0,
                               "b_dec_init": "geometric median (up to 100 iterations)"}


BUILDERS = {
    "ours": build_ours,
    "sae-lens": build_saelens,
    "sae-lens-sparse": lambda args, d: build_saelens(args, d, sparse=True),
    "sparsify": build_sparsify,
    "dictionary-learning": build_dictionary_learning,
}


def worker(args) -> None:
    """Runs one library in this process and writes its result JSON to --result."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # a private file mapping read once: the data counts once in RSS (safetensors' load_file peaks at 2x)
    data = torch.from_file(args.data, shared=False, size=args.rows * args.d, dtype=torch.float32).view(args.rows, args.d)
    float(data.sum())  # fault the pages in now, so the RSS baseline below includes the data
    held, train = data[-args.eval_tokens:], data[:-args.eval_tokens]
    n_batches = train.shape[0] // args.batch_size
    BUILDERS[args.worker]  # noqa: B018 (fail early on an unknown name)
    rss_before = current_rss_mib()

    t0 = time.perf_counter()
    step, reconstruct, notes = BUILDERS[args.worker](args, args.d)
    setup_s = time.perf_counter() - t0

    times = []
    for i in range(args.total_steps):
        j = i % n_batches
        x = train[j * args.batch_size:(j + 1) * args.batch_size]
        start = time.perf_counter()
        step(i, x)
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
        log(f"  {args.worker}: step {i + 1}/{args.total_steps} {elapsed:.3f}s{'' if i >= args.warmup else ' (warm-up)'}")

    with torch.no_grad():
        x_hat = reconstruct(held).float()
        fvu = float((held - x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    result = {
        "status": "ok",
        "tokens_per_s": args.batch_size * len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "timed_steps": len(times),
        "setup_s": setup_s,
        "fvu": fvu,
        "peak_rss_mib": rss_mib(),
        "rss_before_setup_mib": rss_before,
        "rss_growth_mib": rss_mib() - rss_before,
        "notes": notes,
    }
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent: data, GEMM roofline, one subprocess per library, summary
# ---------------------------------------------------------------------------------------------

def load_data(args, n_rows: int) -> tuple[torch.Tensor, dict]:
    """An [n_rows, d] fp32 activation tensor (fewer if the cache is smaller) and where it came from."""
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(n_rows, 576, generator=g) @ (torch.randn(576, 576, generator=g) / 24) + 3 * torch.randn(576, generator=g)
        return x, {"source": "synthetic (correlated Gaussian)", "d": 576}
    import activations
    from activations.cache import CachedActivations

    if Path(args.cache, "manifest.json").is_file():
        cache = CachedActivations(args.cache)
        rows, have = [], 0
        for b in cache.batches(4096, site=args.site, seed=args.seed):
            rows.append(b)
            have += b.shape[0]
            if have >= n_rows:
                break
        return torch.cat(rows)[:n_rows].contiguous(), {
            "source": f"cache {args.cache}", "model": cache.model, "site": args.site or cache.sites[0],
            "cache_tokens": cache.n_tokens, "d": cache.d}
    log(f"no cache at {args.cache}: harvesting {n_rows} tokens from the embedded model ...")
    lm = activations.load_model()
    site = args.site or "blocks.15.hook_resid_post"
    x = torch.cat([b[site] for b in activations.stream(lm, [site], n_tokens=n_rows, seed=args.seed, progress=False)])
    return x.float().contiguous(), {"source": "harvested (embedded default model)", "model": lm.name, "site": site,
                                    "d": int(x.shape[1])}


def gemm_flops(threads: int, repeats: int = 7) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 576, generator=g), torch.randn(576, 9216, generator=g)
    out = torch.empty(4096, 9216)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if i >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flop = 2 * 4096 * 576 * 9216
    return {"shape": "[4096,576] x [576,9216] fp32", "median_s": median, "flop_per_s": flop / median,
            "threads": threads}


def run_worker(lib: str, args, data_path: str, tmp: str) -> dict:
    mod = MODULE[VARIANTS.get(lib, lib)]
    dist = DIST[VARIANTS.get(lib, lib)]
    if importlib.util.find_spec(mod) is None:
        return {"status": "not installed", "reason": f"module {mod!r} (pip package {dist}) not importable in {sys.executable}"}
    result_path = os.path.join(tmp, f"{lib}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", lib, "--data", data_path, "--result", result_path, "--rows", str(args.rows), "--d", str(args.d),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--n-latents", str(args.n_latents), "--k", str(args.k), "--lr", repr(args.lr),
           "--threads", str(args.threads), "--seed", str(args.seed), "--eval-tokens", str(args.eval_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log(f"{lib}: running ({dist} {version(dist)})")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        return {"status": "timeout", "reason": f"exceeded --timeout {args.timeout}s",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not os.path.exists(result_path):
        lines = [ln for ln in proc.stderr.splitlines() if "registered at" not in ln and "fallthrough" not in ln]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
        log(f"{lib}: failed: {errors[-1][:300] if errors else proc.returncode}")
        return {"status": "failed", "returncode": proc.returncode,
                "reason": errors[-1][:500] if errors else None, "stderr_tail": "\n".join(lines)[-1500:]}
    result = json.loads(Path(result_path).read_text())
    result["process_wall_s"] = wall
    log(f"{lib}: {result['tokens_per_s']:,.0f} tokens/s, FVU {result['fvu']:.4f}, peak RSS {result['peak_rss_mib']:.0f} MiB")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per library")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (include data-dependent init)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-latents", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="Adam LR for all (default 2e-4/sqrt(n_latents/2^14))")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for FVU")
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(BUILDERS), help="libraries to run")
    p.add_argument("--saelens-sparse", action="store_true", help="also run SAELens with use_sparse_activations=True")
    p.add_argument("--cache", default="/tmp/bench-cache", help="activation cache folder (sae cache ...)")
    p.add_argument("--site", default=None, help="site in the cache (default: its only site)")
    p.add_argument("--synthetic", action="store_true", help="random data instead of activations (smoke test)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per library subprocess")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-4 / (args.n_latents / 2**14) ** 0.5
    args.total_steps = args.steps + args.warmup
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        try:
            worker(args)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return

    libs = list(dict.fromkeys(args.libs + (["sae-lens-sparse"] if args.saelens_sparse else [])))
    n_rows = args.total_steps * args.batch_size + args.eval_tokens
    data, data_info = load_data(args, n_rows)
    if data.shape[0] < args.batch_size + args.eval_tokens:
        raise SystemExit(f"only {data.shape[0]} tokens of data; need at least batch size + eval tokens")
    d = data.shape[1]
    data_info.update(tokens_used=int(data.shape[0]),
                     train_tokens_distinct=int(data.shape[0] - args.eval_tokens),
                     train_tokens_seen=args.total_steps * args.batch_size, eval_tokens=args.eval_tokens)
    log(f"data: {tuple(data.shape)} from {data_info['source']}")

    gemm = gemm_flops(args.threads)
    flop_per_token = 4 * d * args.n_latents
    roofline_tps = gemm["flop_per_s"] / flop_per_token
    log(f"GEMM: {gemm['flop_per_s'] / 1e9:.1f} GFLOP/s at {args.threads} threads -> roofline {roofline_tps:,.0f} tokens/s")

    results = {}
    with tempfile.TemporaryDirectory(prefix="sae-peers-") as tmp:
        data_path = os.path.join(tmp, "acts.f32")  # raw little-endian float32 rows
        data.float().contiguous().numpy().tofile(data_path)
        args.rows, args.d = data.shape
        del data
        for lib in libs:
            results[lib] = run_worker(lib, args, data_path, tmp)
            results[lib]["version"] = version(DIST[VARIANTS.get(lib, lib)])
            if results[lib].get("status") == "ok":
                results[lib]["roofline_fraction"] = results[lib]["tokens_per_s"] / roofline_tps

    ok = {k: v for k, v in results.items() if v.get("status") == "ok"}
    peers = {k: v for k, v in ok.items() if k != "ours"}
    ratios: dict = {}
    if "ours" in ok:
        ours = ok["ours"]["tokens_per_s"]
        ratios = {f"ours/{k}": ours / v["tokens_per_s"] for k, v in peers.items()}
        if peers:
            fastest = max(peers, key=lambda k: peers[k]["tokens_per_s"])
            ratios["fastest_peer"] = fastest
            ratios["ours/fastest_peer"] = ours / peers[fastest]["tokens_per_s"]
    print(json.dumps({
        "benchmark": "peers: end-to-end TopK SAE training throughput on the same cached activations",
        "libraries": {lib: {"package": DIST[VARIANTS.get(lib, lib)], "version": version(DIST[VARIANTS.get(lib, lib)])}
                      for lib in libs},
        "config": {"d_in": d, "n_latents": args.n_latents, "k": args.k, "batch_size": args.batch_size,
                   "timed_steps": args.steps, "warmup_steps": args.warmup, "lr": args.lr,
                   "lr_schedule": "constant, no warm-up (all libraries)", "optimizer": "Adam(0.9, 0.999)",
                   "dtype": "float32", "threads": args.threads, "seed": args.seed, "data": data_info},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "gemm": gemm,
        "flop_model": {"flop_per_token": flop_per_token, "formula": FLOP_MODEL,
                       "roofline_tokens_per_s": roofline_tps},
        "results": results,
        "ratios": ratios,
    }, indent=2))


if __name__ == "__main__":
    main()
