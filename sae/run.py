"""The main job: train one SAE per activation site, from a live model or saved activations."""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from sae.config import SAEConfig, TrainConfig
from sae.logging import RunLogger
from sae.trainer import Trainer, fit_many


@dataclass
class DataConfig:
    """Where activations come from."""

    model: str | None = None
    """HF model id or local path; None is the embedded SmolLM2-135M-Instruct."""
    sites: list[str] | None = None
    """Hook sites, one SAE each (e.g. blocks.15.hook_resid_post); None: the middle layer's resid_post."""
    activations: str | None = None
    """Train on saved activations instead of running a model: a .safetensors file of [N, d]
    tensors (named by site, or a single tensor) or a directory written by `sae cache`."""
    texts: list[str] | None = None
    """Local .txt/.jsonl files to read; None uses the embedded corpus (stdlib docstrings)."""
    n_tokens: int = 400_000
    """Training tokens per SAE."""
    context_len: int = 128
    """Tokens per window fed to the model (BOS included)."""
    batch_size: int = 4096
    """Activations per optimiser step."""
    device: str = "cpu"
    """Device for the model and the SAEs."""


@dataclass
class RunConfig:
    """How the run is named and logged, and the SAE width relative to the model."""

    expansion_factor: int = 16
    """n_latents = expansion_factor × d_in, unless n_latents is given."""
    n_latents: int | None = None
    """Dictionary size; overrides expansion_factor."""
    wandb_mode: str = "offline"
    """offline (sync later with `wandb sync`), online, or disabled."""
    wandb_project: str = "sae-toolkit"
    """W&B project name."""
    run_name: str | None = None
    """Run name; None makes one from the time."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoints: dict[str, Path]
    summary: dict[str, dict[str, float]]
    out_dir: Path
    wandb_dir: str | None = None
    models: dict = field(default_factory=dict)


def tensor_file_batches(path: str, sites: list[str] | None, batch_size: int, n_tokens: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Batches from a .safetensors file of [N, d] activation tensors, reshuffled each epoch."""
    from sae.checkpoint import read_tensors

    tensors = read_tensors(Path(path))
    if sites:
        missing = [s for s in sites if s not in tensors]
        if missing:
            raise KeyError(f"{path} has no tensors for {missing}; it holds {sorted(tensors)}")
        tensors = {s: tensors[s] for s in sites}
    lengths = {t.shape[0] for t in tensors.values()}
    if any(t.ndim != 2 for t in tensors.values()) or len(lengths) != 1:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{path}: expected 2-D [N, d] tensors with the same N, got {shapes}")
    n_rows = lengths.pop()
    if n_rows < batch_size:
        raise ValueError(f"{path} holds {n_rows} activations, fewer than one batch of {batch_size}; lower --batch-size")
    generator = torch.Generator().manual_seed(seed)
    served = 0
    while served < n_tokens:
        order = torch.randperm(n_rows, generator=generator)
        for start in range(0, n_rows - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {name: t[rows].float() for name, t in tensors.items()}
            served += batch_size
            if served >= n_tokens:
                return


def cache_batches(path: str, sites: list[str] | None, batch_size: int, n_tokens: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Batches from a `sae cache` directory, epoch after epoch until n_tokens are served."""
    import activations

    cache = activations.CachedActivations(path)
    served, epoch = 0, 0
    while served < n_tokens:
        for batch in cache.batch_dicts(batch_size, sites=sites, seed=seed + epoch, drop_last=True):
            yield batch
            served += batch_size
            if served >= n_tokens:
                return
        epoch += 1


def saved_activations(data: DataConfig, seed: int) -> tuple[dict[str, int], Iterator[dict[str, Tensor]], dict]:
    """Widths per site, batches, and provenance for training on stored activations."""
    path = Path(data.activations)
    if path.is_dir():
        import activations

        cache = activations.CachedActivations(path)
        sites = data.sites or cache.sites
        batches = cache_batches(str(path), sites, data.batch_size, data.n_tokens, seed)
        return {s: cache.d for s in sites}, batches, {"model": cache.model, "activations": str(path)}
    batches = tensor_file_batches(str(path), data.sites, data.batch_size, data.n_tokens, seed)
    first = next(batches)
    return {s: t.shape[1] for s, t in first.items()}, itertools.chain([first], batches), {"activations": str(path)}


def model_activations(data: DataConfig, seed: int) -> tuple[dict[str, int], Iterator[dict[str, Tensor]], dict, object]:
    import activations

    lm = activations.load_model(data.model, device=data.device)
    sites = data.sites or [f"blocks.{lm.n_layers // 2}.hook_resid_post"]
    texts = None if not data.texts else list(activations.read_text_files(data.texts))
    stream = activations.stream(
        lm, sites, texts=texts, context_len=data.context_len, batch_size=data.batch_size,
        n_tokens=data.n_tokens, seed=seed, progress=False,
    )
    return {s: lm.d_model for s in sites}, stream, {"model": lm.name}, lm


def downstream_evaluator(lm, site: str, n_tokens: int = 1024):
    """CE-loss and KL scores with the SAE spliced into the model, on held-out text."""
    import analysis

    def evaluate(model) -> dict[str, float]:
        report = analysis.evaluate(model, lm, site, n_tokens=n_tokens, absorption=False, probing=False, contrastive=False)
        return {key: report[key] for key in ("ce_loss_score", "kl_score", "delta_ce")}

    return evaluate


def train(
    sae_cfg: dict,
    train_cfg: TrainConfig,
    data: DataConfig,
    run: RunConfig,
    resume: bool = False,
) -> TrainResult:
    """Train one SAE per site. `sae_cfg` holds SAEConfig fields except d_in (taken from the data)
    and n_latents (from the run config). With `resume`, each site continues from its checkpoint
    in the run directory, skipping the batches it has already seen."""
    from sae import create

    name = run.run_name or time.strftime("sae-%Y%m%d-%H%M%S")
    out_dir = Path(train_cfg.out_dir or Path("runs") / name)
    train_cfg = replace(train_cfg, out_dir=str(out_dir))
    lm = None
    if data.activations:
        widths, batches, source = saved_activations(data, train_cfg.seed)
    else:
        widths, batches, source, lm = model_activations(data, train_cfg.seed)
    steps = math.ceil(data.n_tokens / data.batch_size)
    torch.manual_seed(train_cfg.seed)
    models = {}
    for site, d in widths.items():
        models[site] = create(SAEConfig(d_in=d, n_latents=run.n_latents or run.expansion_factor * d, **sae_cfg)).to(data.device)
        models[site].metadata = {**source, "site": site}
    config = {"sae": sae_cfg, "train": asdict(train_cfg), "data": asdict(data), "run": asdict(run), "source": source}
    logger = RunLogger(out_dir, wandb_mode=run.wandb_mode, project=run.wandb_project, run_name=name, config=config)
    (out_dir / "run_config.json").write_text(json.dumps(config, indent=2) + "\n")
    trainers = {}
    for site, model in models.items():
        evaluator = downstream_evaluator(lm, site) if lm is not None else None
        if resume:
            trainers[site] = Trainer.resume(out_dir / site, logger=logger, evaluator=evaluator)
            models[site] = trainers[site].model
        else:
            cfg = replace(train_cfg, steps=train_cfg.steps or steps)
            trainers[site] = Trainer(model, cfg, logger=logger, name=site, evaluator=evaluator)
    try:
        fit_many(trainers, batches)
    finally:
        logger.finish()
    summary = {site: t.last_metrics for site, t in trainers.items()}
    return TrainResult(
        checkpoints={site: t.checkpoint_dir() for site, t in trainers.items()},
        summary=summary,
        out_dir=out_dir,
        wandb_dir=str(out_dir / "wandb") if run.wandb_mode != "disabled" else None,
        models=models,
    )
