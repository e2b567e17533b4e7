"""The train driver: one SAE per activation site, from a live model or saved activations."""
from __future__ import annotations

import math
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import activations
import analysis
import atomicfs
from sae import create, registry
from sae.app.data import DataSource, from_activations, from_model, is_site, resolve_device
from sae.config import SAEConfig, TrainConfig
from sae.logging import RunLogger
from sae.trainer import Trainer, fit_many


@dataclass
class DataConfig:
    """Where activations come from."""

    model: str | None = None
    """HF model id or local path; None is the embedded SmolLM2-135M-Instruct. With a tensor
    file of activations, the model they came from (recorded for `sae eval`)."""
    sites: list[str] | None = None
    """Hook sites, one SAE each (e.g. blocks.15.hook_resid_post); None: the middle layer's resid_post.
    With a tensor file: the tensors to use, or the site of its single tensor."""
    target_sites: list[str] | None = None
    """Transcoders only: the site each of `sites` predicts, in the same order (e.g.
    blocks.5.hook_mlp_out for blocks.5.mlp.hook_in); read in the same forward pass or cache."""
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
    device: str = "auto"
    """Device for the model and the SAEs: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "context_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


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
    """Run name (the folder under runs/); None makes one from the time plus a random suffix."""

    def __post_init__(self) -> None:
        if self.expansion_factor < 1 or (self.n_latents is not None and self.n_latents < 1):
            raise ValueError("expansion_factor and n_latents must be positive integers")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")


@dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoints: dict[str, Path]
    summary: dict[str, dict[str, float]]
    out_dir: Path
    wandb_dir: str | None = None
    models: dict = field(default_factory=dict)


def downstream_evaluator(lm, site: str, texts: list[str] | None = None, n_tokens: int = 1024):
    """CE-loss and KL scores with the SAE spliced into the model, on the held-out documents of
    `texts` (None: the embedded corpus), which the training stream never reads. None (with a
    warning) when `texts` has no held-out document."""
    if texts is not None and not any(activations.split_of(doc) == "heldout" for doc in texts):
        warnings.warn(
            f"none of the {len(texts)} training documents is in the held-out split, so the run logs no "
            "CE-loss / KL score; pass more (or longer) text files to get one", stacklevel=2,
        )
        return None

    def evaluate(model) -> dict[str, float]:
        report = analysis.evaluate(
            model, lm, site, texts=texts, n_tokens=n_tokens, split="heldout", absorption=False, probing=False,
            contrastive=False, progress=False,
        )
        return {key: report[key] for key in ("ce_loss_score", "kl_score", "delta_ce")}

    return evaluate


RUN_CONFIG = "run_config.json"


def default_run_name() -> str:
    """Time plus a random suffix: two runs started in the same second get different folders."""
    return time.strftime("sae-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def open_source(data: DataConfig, seed: int) -> DataSource:
    device = resolve_device(data.device)
    sites = data.sites and list(dict.fromkeys(data.sites + (data.target_sites or [])))
    if data.activations:
        return from_activations(data.activations, sites, data.batch_size, data.n_tokens, seed, data.model)
    return from_model(data.model, sites, data.texts, data.context_len, data.batch_size, data.n_tokens, seed, device)


def transcoder_targets(architecture: str, data: DataConfig) -> dict[str, str]:
    """{input site: target site} for a transcoder run, {} otherwise; one-line errors on a mismatch."""
    if not registry.get(architecture).predicts_target:
        if data.target_sites:
            raise ValueError(f"--target-sites is for transcoders; a {architecture} SAE reconstructs its own site")
        return {}
    if not data.sites or not data.target_sites or len(data.sites) != len(data.target_sites):
        raise ValueError(
            f"a {architecture} reads one site and predicts another: pass --sites and --target-sites of the same "
            "length, e.g. --sites blocks.5.mlp.hook_in --target-sites blocks.5.hook_mlp_out"
        )
    return dict(zip(data.sites, data.target_sites))


def with_targets(batches: Iterator[dict], targets: dict[str, str]) -> Iterator[dict]:
    """A transcoder's batches: {input site: (input, target)} from {site: activations}."""
    for batch in batches:
        yield {site: (batch[site], batch[target]) for site, target in targets.items()}


def site_folders(sites: list[str]) -> dict[str, str]:
    """One safe folder name per site (tensor names from a file may be anything)."""
    folders = {site: atomicfs.safe_name(site) for site in sites}
    if len(set(folders.values())) != len(folders):
        raise ValueError(f"sites {sites} map to clashing folder names {sorted(folders.values())}; rename the tensors")
    return folders


def train(
    sae_cfg: dict,
    train_cfg: TrainConfig,
    data: DataConfig,
    run: RunConfig,
    resume: bool = False,
) -> TrainResult:
    """Train one SAE per site. `sae_cfg` holds SAEConfig fields except d_in (taken from the data)
    and n_latents (from the run config). With `resume`, each site continues from its checkpoint
    in the run folder `train_cfg.out_dir`, skipping the batches it has already seen.

    The run owns its folder (a lock) while it runs; a new run that fails before its first
    checkpoint removes the folder it created."""
    name = run.run_name or default_run_name()
    out_dir = Path(train_cfg.out_dir or Path("runs") / name)
    train_cfg = replace(train_cfg, out_dir=str(out_dir))
    created = not out_dir.exists()
    with atomicfs.DirLock(out_dir, "run folder"):
        try:
            return _train_locked(sae_cfg, train_cfg, data, run, resume, name, out_dir)
        except BaseException:
            if created and not resume and not _has_checkpoint(out_dir):
                shutil.rmtree(out_dir, ignore_errors=True)
            raise


def _has_checkpoint(out_dir: Path) -> bool:
    return out_dir.is_dir() and any((p / "trainer_state.json").is_file() for p in out_dir.iterdir())


def _train_locked(
    sae_cfg: dict, train_cfg: TrainConfig, data: DataConfig, run: RunConfig, resume: bool, name: str, out_dir: Path
) -> TrainResult:
    if not resume and (out_dir / RUN_CONFIG).is_file():
        raise ValueError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or choose another --out-dir")
    targets = transcoder_targets(sae_cfg.get("architecture", "topk"), data)
    source = open_source(data, train_cfg.seed)
    widths = {site: source.widths[site] for site in targets} if targets else source.widths
    folders = site_folders(list(widths))
    device = resolve_device(data.device)
    torch.manual_seed(train_cfg.seed)
    models = {}
    for site, d in widths.items():
        models[site] = create(SAEConfig(d_in=d, n_latents=run.n_latents or run.expansion_factor * d, **sae_cfg)).to(device)
        site_meta = {"site": site} if is_site(site) else {"tensor": site}
        if site in targets:
            site_meta["target_site" if is_site(targets[site]) else "target_tensor"] = targets[site]
        models[site].metadata = {**source.provenance, **site_meta}
    config = {
        "sae": sae_cfg, "train": asdict(train_cfg), "data": asdict(data), "run": asdict(run), "source": source.provenance,
    }
    if not resume:  # a resume rewrites it only once it succeeds, so a failed one changes nothing
        atomicfs.write_json(out_dir / RUN_CONFIG, config)
    for site in models:
        if resume and atomicfs.recover(out_dir / folders[site]) is None:
            raise FileNotFoundError(
                f"{out_dir} has no checkpoint for {site} (the run stopped before its first save); start it again without --resume"
            )
    steps = math.ceil(data.n_tokens / data.batch_size)
    logger = RunLogger(out_dir, wandb_mode=run.wandb_mode, project=run.wandb_project, run_name=name, config=config)
    trainers = {}
    try:
        for site, model in models.items():
            evaluator = downstream_evaluator(source.lm, site, source.texts) if source.lm is not None else None
            if resume:
                trainers[site] = Trainer.resume(
                    out_dir / folders[site], logger=logger, evaluator=evaluator, out_dir=str(out_dir),
                    kernel_backend=sae_cfg.get("kernel_backend", "auto"),
                )
                resumed = trainers[site].model.to(device)
                resumed.metadata = resumed.metadata or model.metadata  # checkpoints older than metadata in the state
                models[site] = resumed
            else:
                cfg = replace(train_cfg, steps=train_cfg.steps or steps)
                trainers[site] = Trainer(model, cfg, logger=logger, name=site, evaluator=evaluator)
        fit_many(trainers, with_targets(source.batches, targets) if targets else source.batches)
    finally:
        logger.finish()
    if resume:
        atomicfs.write_json(out_dir / RUN_CONFIG, config)
    summary = {site: t.last_metrics for site, t in trainers.items()}
    return TrainResult(
        checkpoints={site: t.checkpoint_dir() for site, t in trainers.items()},
        summary=summary,
        out_dir=out_dir,
        wandb_dir=str(out_dir / "wandb") if run.wandb_mode != "disabled" else None,
        models=models,
    )

