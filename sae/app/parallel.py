"""`sae train` under torchrun: which data and which sites each process trains on.

Data parallel (default): every rank trains every site's SAE on its contiguous slice of each
global batch (`batch_size` is the global batch). From saved activations every rank reads the
same shuffled stream and keeps its slice, so the ranks together train exactly what one process
would. From a live model each rank reads its own share of the documents (every world-th one),
so the data differ from a one-process run's (the same documents, in another order and mix).

Sites distributed (`--distribute-sites`): site i's SAE trains on rank i mod world, on the full
global batch. From saved activations every rank reads the whole stream; from a live model each
rank runs the forward on its share of the documents and each site's rows are gathered on the
rank that trains it.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sae.app.data import Batch, DataSource, from_activations, from_model
from sae.distributed import Distributed
from sae.logging import RunLogger

if TYPE_CHECKING:  # run.py imports this module
    from sae.app.run import DataConfig, RunConfig


def owned_sites(sites: list[str], ranks: Distributed | None, distribute_sites: bool) -> list[str]:
    """The sites this process trains."""
    if ranks is None or not distribute_sites:
        return sites
    if len(sites) < ranks.world_size:
        raise ValueError(
            f"--distribute-sites over {ranks.world_size} processes needs at least as many sites, got {len(sites)}; "
            "start fewer processes or train data-parallel (without --distribute-sites)"
        )
    return sites[ranks.rank :: ranks.world_size]


def open_source(data: DataConfig, seed: int, ranks: Distributed, distribute_sites: bool) -> DataSource:
    """This process's activation stream (a resume replays it: the saved-position skip is one process's)."""
    if data.activations:
        source = from_activations(data.activations, data.sites, data.batch_size, data.n_tokens, seed, data.model)
        source.continue_at = source.save_position = None
        if not distribute_sites:
            source.batches = row_slices(source.batches, ranks)
        return source
    rows = ranks.shard(data.batch_size)
    per_rank = rows.stop - rows.start
    steps = -(-data.n_tokens // data.batch_size)  # full batches on every rank
    source = from_model(data.model, data.sites, data.texts, data.context_len, per_rank, steps * per_rank, seed,
                        ranks.device, data.chat, data.sequential, shard=(ranks.rank, ranks.world_size))
    if distribute_sites:
        source.batches = gathered_on_owner(source.batches, list(source.widths), ranks)
    return source


def row_slices(batches: Iterator[Batch], ranks: Distributed) -> Iterator[Batch]:
    """This rank's rows of every global batch."""
    for batch in batches:
        rows = ranks.shard(len(next(iter(batch.values()))))
        yield {site: t[rows] for site, t in batch.items()}


def gathered_on_owner(batches: Iterator[Batch], sites: list[str], ranks: Distributed) -> Iterator[Batch]:
    """Every rank's rows of each site, concatenated in rank order on the rank that trains it."""
    for batch in batches:
        mine = {}
        for i, site in enumerate(sites):
            owner = i % ranks.world_size
            local = batch[site].contiguous()
            parts = [local.new_empty(local.shape) for _ in range(ranks.world_size)] if owner == ranks.rank else None
            dist.gather(local, parts, dst=owner)
            if parts is not None:
                mine[site] = torch.cat(parts)
        yield mine


def run_logger(
    out_dir: Path, run: RunConfig, name: str, config: dict, ranks: Distributed | None, distribute_sites: bool
) -> RunLogger | None:
    """Rank 0 logs (W&B, metrics.jsonl, console); with distributed sites each other rank logs its
    own sites to metrics.rank<R>.jsonl; data-parallel ranks other than 0 log nothing (their
    metrics are rank 0's)."""
    if ranks is None or ranks.is_main:
        return RunLogger(out_dir, wandb_mode=run.wandb_mode, project=run.wandb_project, run_name=name, config=config)
    if distribute_sites:
        return RunLogger(out_dir, wandb_mode="disabled", metrics_file=f"metrics.rank{ranks.rank}.jsonl")
    return None
