"""Where a run's activations come from: a live model, a `sae cache` folder, or a tensor file."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

import activations
from sae.app.resume import LiveStreamResume

Batch = dict[str, Tensor]


@dataclass
class DataSource:
    """A run's activation stream and what it came from."""

    widths: dict[str, int]
    """Activation width per site (one SAE each)."""
    batches: Iterator[Batch]
    """The training stream: {site: [batch_size, d]} dicts."""
    provenance: dict[str, str] = field(default_factory=dict)
    """Recorded in every checkpoint's metadata (model, activations path, ...)."""
    lm: activations.LanguageModel | None = None
    """The live model, when the activations come from one (enables the CE-score evaluator)."""
    texts: list | None = None
    """The documents the live model reads (None: the embedded corpus); training reads their
    train split, the evaluator their held-out split."""
    members: dict[str, list[str]] = field(default_factory=dict)
    """For an SAE shared by a layer group (see sae.app.layer_groups): its name -> the sites it reads."""
    chat: bool = False
    """`texts` are conversations under the chat template (None: the built-in chat set)."""
    continue_at: Callable[[Path, int], tuple[Iterator[Batch], int]] | None = None
    """Resume without replay: `continue_at(run_dir, step)` gives the batches from the trainers'
    `step` on (or from an earlier saved position) and the batch they start at; None: replay."""
    save_position: Callable[[Path, int], None] | None = None
    """Called after the checkpoints of a step are in the run folder: saves what `continue_at` needs."""


def resolve_device(device: str) -> str:
    """The one device rule of every command: auto is cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available on this machine (no CUDA); use --device cpu or auto")
    return device


def read_activation_file(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable .safetensors activation file ({err})") from err


def tensor_file_batches(
    tensors: dict[str, Tensor], path: Path, batch_size: int, n_tokens: int, seed: int, start_batch: int = 0
) -> Iterator[Batch]:
    """Batches from [N, d] activation tensors (one per site), reshuffled each epoch; `start_batch`
    continues at that batch of the sequence (earlier epochs' orders are drawn, no row is read)."""
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    lengths = {t.shape[0] for t in tensors.values()}
    if any(t.ndim != 2 for t in tensors.values()) or len(lengths) != 1:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{path}: expected 2-D [N, d] tensors with the same N, got {shapes}")
    n_rows = lengths.pop()
    if n_rows < batch_size:
        raise ValueError(f"{path} holds {n_rows} activations, fewer than one batch of {batch_size}; lower --batch-size")
    generator = torch.Generator().manual_seed(seed)
    skipped_epochs, skip = divmod(start_batch, n_rows // batch_size)
    for _ in range(skipped_epochs):
        torch.randperm(n_rows, generator=generator)
    served = start_batch * batch_size
    while served < n_tokens:
        order = torch.randperm(n_rows, generator=generator)
        for start in range(skip * batch_size, n_rows - batch_size + 1, batch_size):
            yield {name: t[order[start : start + batch_size]].float() for name, t in tensors.items()}
            served += batch_size
            if served >= n_tokens:
                return
        skip = 0


def pick_tensors(tensors: dict[str, Tensor], sites: list[str] | None, path: Path) -> dict[str, Tensor]:
    """The tensors to train on, keyed by site: --sites picks tensors by name, except that one hook
    site given for a file of one tensor names that tensor (`--sites blocks.3.hook_resid_post`)."""
    if not sites:
        return tensors
    if len(tensors) == 1 and len(sites) == 1 and sites[0] not in tensors and is_site(sites[0]):
        return {sites[0]: next(iter(tensors.values()))}
    missing = [s for s in sites if s not in tensors]
    if missing:
        raise KeyError(f"{path} has no tensors for {missing}; it holds {_compact(sorted(tensors))}")
    return {s: tensors[s] for s in sites}


def is_site(name: str) -> bool:
    try:
        activations.check_site_name(name)
    except ValueError:
        return False
    return True


def _compact(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def from_activations(
    path: str, sites: list[str] | None, batch_size: int, n_tokens: int, seed: int, model: str | None = None
) -> DataSource:
    """Stored activations: a `sae cache` folder or a .safetensors tensor file. `model` names the
    model a tensor file came from (recorded in the checkpoints; a cache records its own)."""
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"no activations file or cache folder at {location}")
    if location.is_dir():
        cache = activations.CachedActivations(location)
        sites = sites or cache.sites
        unknown = [s for s in sites if s not in cache.sites]
        if unknown:
            raise KeyError(f"{location} holds no site {unknown}; it has {_compact(cache.sites)}")
        per_epoch = cache.n_tokens // batch_size * batch_size  # full batches only
        if per_epoch == 0:
            raise ValueError(f"{location} holds {cache.n_tokens} tokens, fewer than one batch of {batch_size}; lower --batch-size")
        epochs, total = -(-n_tokens // per_epoch), -(-n_tokens // batch_size)

        def cache_batches(start: int) -> Iterator[Batch]:
            stream = cache.batch_dicts(batch_size, sites=sites, seed=seed, epochs=epochs, drop_last=True, start_batch=start)
            return itertools.islice(stream, max(0, total - start))

        return DataSource(
            {s: cache.d for s in sites}, cache_batches(0), {"model": cache.model, "activations": str(location)},
            continue_at=lambda run_dir, step: (cache_batches(step), step),
        )
    tensors = pick_tensors(read_activation_file(location), sites, location)
    batches = tensor_file_batches(tensors, location, batch_size, n_tokens, seed)
    first = next(batches)
    provenance = {"activations": str(location), **({"model": model} if model else {})}
    return DataSource(
        {s: t.shape[1] for s, t in first.items()}, itertools.chain([first], batches), provenance,
        continue_at=lambda run_dir, step: (tensor_file_batches(tensors, location, batch_size, n_tokens, seed, step), step),
    )


def from_model(
    model: str | None, sites: list[str] | None, texts: list[str] | None, context_len: int, batch_size: int,
    n_tokens: int, seed: int, device: str, chat: bool = False, sequential: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> DataSource:
    """Activations harvested from a live model over text, one forward pass for every site; `chat`
    reads conversations under the chat template, `sequential` whole samples (activations.stream).
    `shard` (rank, world size): read only every world-th document from the rank-th on."""
    for site in sites or []:
        activations.check_site_name(site)  # before the model loads
    if not chat and texts and all(activations.is_chat_file(t) for t in texts):
        raise ValueError(f"{texts[0]} holds chat conversations ('messages'); add --chat to apply the chat template")
    lm = activations.load_model(model, device=device)
    sites = sites or [f"blocks.{lm.n_layers // 2}.hook_resid_post"]
    for site in sites:
        activations.parse_site(lm, site)
    if chat:
        activations.chat.check_chat_template(lm.tokenizer, lm.name)
        docs = None if not texts else list(activations.read_chat_files(texts))
        source, mix = docs, None
    else:
        docs, source, mix = text_source(lm, texts, context_len, n_tokens, seed)
    rank, world = shard
    if world > 1:
        if chat or mix:
            raise ValueError(
                "data parallel from a live model shards plain-text documents; for --chat or NAME:WEIGHT mixes, "
                "write the activations with `sae cache` and train from the cache"
            )
        source = (docs or activations.default_texts())[rank::world]

    def open_stream(position: activations.StreamPosition | None = None) -> Iterator[Batch]:
        # The trainer shows its own bar; the stream shows only the shuffle buffer filling.
        return activations.stream(
            lm, sites, texts=source, context_len=context_len, batch_size=batch_size, n_tokens=n_tokens, seed=seed,
            progress=False, fill_progress=True, split="train", chat=chat, sequential=sequential, position=position,
        )

    if chat or sequential or world > 1:  # resumed by replay: a saved position covers one process's text windows
        stream, resume = open_stream(), {}
    else:
        live = LiveStreamResume(open_stream)
        stream = live.batches
        resume = {"continue_at": live.continue_at, "save_position": live.save}
    provenance = {"model": lm.name, "text_split": "train", "heldout_fraction": str(activations.HELDOUT_FRACTION)}
    for flag, on in (("chat", chat), ("sequential", sequential)):
        if on:
            provenance[flag] = "true"
    if mix:
        provenance["text_mix"] = ",".join(f"{name}:{weight:g}" for name, weight in mix.items())
    return DataSource({s: lm.d_model for s in sites}, stream, provenance, lm, docs, chat=chat, **resume)


def text_source(
    lm: activations.LanguageModel, texts: list[str] | None, context_len: int, n_tokens: int, seed: int
) -> tuple[list[str] | None, list[str] | torch.Tensor | None, dict[str, float] | None]:
    """(documents, what the stream reads, mix weights) for --texts: sources by name or path read
    one after another, or mixed by `NAME:WEIGHT` into token windows of their train splits (then
    the documents, taken from each source in turn, serve the held-out CE/KL evaluator)."""
    if not texts:
        return None, None, None
    mix = activations.parse_mix(texts)
    if mix is None:
        docs = [doc for name in texts for doc in activations.named_texts(name)]
        return docs, docs, None
    sources = {name: activations.named_texts(name) for name in mix}
    # Dropped separators and BOS make a window yield a little less than context_len - 1 tokens.
    n_windows = math.ceil(1.05 * n_tokens / (context_len - 1)) + 1
    windows = activations.mixed_windows(lm.tokenizer, sources, mix, n_windows, context_len, seed)
    return activations.interleave(list(sources.values())), windows, mix
