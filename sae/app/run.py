"""The train driver: one SAE per activation site, from a live model or saved activations."""
from __future__ import annotations

import json
import math
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import activations
import analysis
import atomicfs
from sae import create, distributed, registry
from sae.app import layer_groups, parallel
from sae.app.data import DataSource, from_activations, from_model, is_site, resolve_device
from sae.config import SAEConfig, TrainConfig
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
    """Text sources: .txt/.jsonl files or the names docstrings (stdlib docstrings), selfgen (text
    sampled from SmolLM2-135M-Instruct itself, shipped), packages (installed packages' READMEs);
    NAME:WEIGHT entries mix them in those token proportions (docstrings:0.5 selfgen:0.5).
    None: docstrings."""
    n_tokens: int = 400_000
    """Training tokens per SAE."""
    context_len: int = 128
    """Tokens per window fed to the model (BOS included); with sequential, the most of one sample."""
    batch_size: int = 4096
    """Activations per optimiser step."""
    device: str = "auto"
    """Device for the model and the SAEs: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    layers: str | None = None
    """Layers to harvest, e.g. 0-29 or 3,5,8-11: short for --sites blocks.L.hook_resid_post for each."""
    layer_groups: str | None = None
    """One SAE per group of adjacent layers instead of one per layer: auto:G (G contiguous groups
    clustered by the angular similarity of the layers' activations on the first batch) or explicit
    layer ranges, e.g. 0-7,8-15,16-29 (alone, they also choose the layers)."""
    layer_group_rows: str = "all"
    """What a group SAE trains on: all (each token gives one row per member layer, k x batch_size
    rows a step) or one (each token gives the row of one random member layer: batch_size rows a
    step, so a group SAE costs what one layer's SAE costs)."""
    chat: bool = False
    """Chat data for an instruct model: texts are chat JSONL ({"messages": [{role, content}, ...]} a
    line), or without texts the built-in chat set (stdlib Q/A); the model's chat template is applied."""
    sequential: bool = False
    """FAST: whole samples in order, one per sequence cut at context_len, never packed together
    (default: shuffled documents packed into windows)."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "context_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        layer_groups.check_options(self.layers, self.layer_groups, self.layer_group_rows, self.sites)


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
    distribute_sites: bool = False
    """Under torchrun: each process trains its share of the sites' SAEs on whole batches, instead
    of every SAE on its slice of each batch (data parallel)."""

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


def downstream_evaluator(
    lm, site: str | list[str], texts: list | None = None, n_tokens: int = 1024, chat: bool = False
):
    """CE-loss and KL scores with the SAE spliced into the model, on the held-out documents of
    `texts` (None: the embedded corpus; with `chat`, conversations and the built-in chat set),
    which the training stream never reads. None (with a warning) when `texts` has no held-out
    document. Several sites (a layer group's SAE): the mean over them, plus each one's scores as
    `ce_loss_score@SITE` etc."""
    key = activations.conversation_key if chat else str
    if texts is not None and not any(activations.split_of(key(doc)) == "heldout" for doc in texts):
        warnings.warn(
            f"none of the {len(texts)} training documents is in the held-out split, so the run logs no "
            "CE-loss / KL score; pass more (or longer) text files to get one", stacklevel=2,
        )
        return None

    sites = [site] if isinstance(site, str) else site
    keys = ("ce_loss_score", "kl_score", "delta_ce")

    def evaluate(model) -> dict[str, float]:
        scores = {}
        for one in sites:
            # Two windows per forward: each holds a [windows, context, vocab] logits tensor (SmolLM2's
            # vocab is 49152), which at the default 8 windows made this the run's peak memory.
            report = analysis.evaluate(
                model, lm, one, texts=texts, n_tokens=n_tokens, split="heldout", absorption=False, probing=False,
                contrastive=False, progress=False, chat=chat, batch_size=2,
            )
            scores[one] = {key: report[key] for key in keys}
        if len(sites) == 1:
            return scores[sites[0]]
        mean = {key: sum(s[key] for s in scores.values()) / len(sites) for key in keys}
        return {**mean, **{f"{key}@{one}": s[key] for one, s in scores.items() for key in keys}}

    return evaluate


RUN_CONFIG = "run_config.json"


def default_run_name() -> str:
    """Time plus a random suffix: two runs started in the same second get different folders."""
    return time.strftime("sae-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def open_source(data: DataConfig, seed: int) -> DataSource:
    device = resolve_device(data.device)
    sites = layer_groups.member_sites(data.layers, data.layer_groups, data.sites)
    sites = sites and list(dict.fromkeys(sites + (data.target_sites or [])))
    if data.activations:
        return from_activations(data.activations, sites, data.batch_size, data.n_tokens, seed, data.model)
    return from_model(
        data.model, sites, data.texts, data.context_len, data.batch_size, data.n_tokens, seed, device,
        data.chat, data.sequential,
    )


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
    checkpoint removes the folder it created. Under torchrun (see `sae.app.parallel`) rank 0
    owns the folder and writes the run's files."""
    ranks = distributed.init(resolve_device(data.device))
    name = run.run_name or default_run_name()
    if ranks is not None:
        name = ranks.broadcast_text(name)
    out_dir = Path(train_cfg.out_dir or Path("runs") / name)
    train_cfg = replace(train_cfg, out_dir=str(out_dir))
    main = ranks is None or ranks.is_main
    created = not out_dir.exists()
    try:
        with atomicfs.DirLock(out_dir, "run folder") if main else nullcontext():
            try:
                return _train_locked(sae_cfg, train_cfg, data, run, resume, name, out_dir, ranks)
            except BaseException:
                if main and created and not resume and not _has_checkpoint(out_dir):
                    shutil.rmtree(out_dir, ignore_errors=True)
                raise
    finally:
        distributed.shutdown()


def _has_checkpoint(out_dir: Path) -> bool:
    return out_dir.is_dir() and any((p / "trainer_state.json").is_file() for p in out_dir.iterdir())


def _train_locked(
    sae_cfg: dict, train_cfg: TrainConfig, data: DataConfig, run: RunConfig, resume: bool, name: str, out_dir: Path,
    ranks: distributed.Distributed | None = None,
) -> TrainResult:
    main = ranks is None or ranks.is_main
    if main and not resume and (out_dir / RUN_CONFIG).is_file():
        raise ValueError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or choose another --out-dir")
    targets = transcoder_targets(sae_cfg.get("architecture", "topk"), data)
    if targets and (ranks is not None or data.layer_groups):
        raise ValueError("transcoders train in one process and without --layer-groups")
    if ranks is None:
        source = open_source(data, train_cfg.seed)
    else:
        if data.layer_groups:
            raise ValueError("--layer-groups does not run under torchrun yet; train the groups in one process")
        source = parallel.open_source(data, train_cfg.seed, ranks, run.distribute_sites)
    grouping = None
    if data.layer_groups:
        source, grouping = layer_groups.share_by_group(
            source, data.layer_groups, data.layer_group_rows, train_cfg.seed, resume
        )
        data = replace(data, layer_groups=grouping.spec)  # the groups chosen: a resume reuses them
        print(f"layer groups ({grouping.record['spec']}): {', '.join(grouping.groups)}", flush=True)
    widths = {site: source.widths[site] for site in targets} if targets else source.widths
    folders = site_folders(list(widths))
    device = resolve_device(data.device) if ranks is None else ranks.device
    torch.manual_seed(train_cfg.seed)
    models = {}
    for site, d in widths.items():
        models[site] = create(SAEConfig(d_in=d, n_latents=run.n_latents or run.expansion_factor * d, **sae_cfg)).to(device)
        members = source.members.get(site)
        site_meta = {"site": members[0], "sites": members} if members else {"site": site} if is_site(site) else {"tensor": site}
        if site in targets:
            site_meta["target_site" if is_site(targets[site]) else "target_tensor"] = targets[site]
        models[site].metadata = {**source.provenance, **site_meta}
    models = {site: models[site] for site in parallel.owned_sites(list(models), ranks, run.distribute_sites)}
    data_parallel = ranks if ranks is not None and not run.distribute_sites else None
    config = {
        "sae": sae_cfg, "train": asdict(train_cfg), "data": asdict(data), "run": asdict(run), "source": source.provenance,
        **({"layer_groups": grouping.record} if grouping else {}),
    }
    if resume and grouping:  # keep the similarity the groups were chosen on (a resume reuses the groups as given)
        config["layer_groups"] = json.loads((out_dir / RUN_CONFIG).read_text()).get("layer_groups", grouping.record)
    if main and not resume:  # a resume rewrites it only once it succeeds, so a failed one changes nothing
        atomicfs.write_json(out_dir / RUN_CONFIG, config)
    for site in models:
        if resume and (main or data_parallel is None) and atomicfs.recover(out_dir / folders[site]) is None:
            raise FileNotFoundError(
                f"{out_dir} has no checkpoint for {site} (the run stopped before its first save); start it again without --resume"
            )
    if ranks is not None:
        ranks.barrier()  # rank 0 has checked and prepared the folder
    steps = math.ceil(data.n_tokens / data.batch_size)
    logger = parallel.run_logger(out_dir, run, name, config, ranks, run.distribute_sites)
    trainers = {}
    try:
        for site, model in models.items():
            evaluated = source.members.get(site, site)
            evaluates = source.lm is not None and (main or data_parallel is None)
            evaluator = downstream_evaluator(source.lm, evaluated, source.texts, chat=source.chat) if evaluates else None
            if resume:
                trainers[site] = Trainer.resume(
                    out_dir / folders[site], logger=logger, evaluator=evaluator, out_dir=str(out_dir),
                    kernel_backend=sae_cfg.get("kernel_backend", "auto"), data_parallel=data_parallel,
                )
                resumed = trainers[site].model.to(device)
                resumed.metadata = resumed.metadata or model.metadata  # checkpoints older than metadata in the state
                models[site] = resumed
            else:
                cfg = replace(train_cfg, steps=train_cfg.steps or steps)
                trainers[site] = Trainer(model, cfg, logger=logger, name=site, evaluator=evaluator, data_parallel=data_parallel)
        batches, first_batch = source.batches, 0
        if resume and source.continue_at is not None:  # skip what the checkpoints saw without recomputing it
            batches, first_batch = source.continue_at(out_dir, next(iter(trainers.values())).step)
        on_saved = None if source.save_position is None else lambda step: source.save_position(out_dir, step)
        if targets:
            batches = with_targets(batches, targets)
        fit_many(trainers, batches, progress=main, first_batch=first_batch, on_saved=on_saved)
    finally:
        if logger is not None:
            logger.finish()
    if main and resume:
        atomicfs.write_json(out_dir / RUN_CONFIG, config)
    summary = {site: t.last_metrics for site, t in trainers.items()}
    return TrainResult(
        checkpoints={site: t.checkpoint_dir() for site, t in trainers.items()},
        summary=summary,
        out_dir=out_dir,
        wandb_dir=str(out_dir / "wandb") if run.wandb_mode != "disabled" else None,
        models=models,
    )

