"""Text sources by name, and weighted mixes of them at the token-window level.

A source is `docstrings` (the embedded stdlib corpus), `selfgen` (the shipped corpus sampled
from SmolLM2-135M-Instruct itself, see `selfgen.py`), `packages` (the installed packages'
descriptions, see `package_docs.py`) or a .txt/.jsonl file. `NAME:WEIGHT` entries mix sources:
each source is cut into windows from its own documents of the split, and the mix takes
windows in proportion to the weights, so the proportions hold in tokens (up to the document
separators the stream drops).
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .package_docs import package_descriptions
from .text import HELDOUT_FRACTION, Split, default_texts, read_text_files, select_split, token_windows

SELFGEN_CORPUS = Path(__file__).with_name("data") / "selfgen-smollm2-135m.jsonl"
"""59 documents, 12,013 tokens sampled by SmolLM2-135M-Instruct from BOS at temperature 1
(`sae generate --tokens 12000 --batch-size 64 --seed 0`; its manifest lies beside it)."""
NAMED_SOURCES = ("docstrings", "selfgen", "packages")


def named_texts(name: str) -> list[str]:
    """Every document of one source: a name of `NAMED_SOURCES` or a .txt/.jsonl file path."""
    if name == "docstrings":
        return default_texts()
    if name == "selfgen":
        return list(read_text_files([SELFGEN_CORPUS]))
    if name == "packages":
        return package_descriptions()
    if not Path(name).is_file():
        raise FileNotFoundError(f"text source {name!r} is neither a file nor one of {NAMED_SOURCES}")
    return list(read_text_files([name]))


def _weight(spec: str) -> tuple[str, float | None]:
    """(name, weight) of `NAME:WEIGHT`; (spec, None) when it ends in no number."""
    name, sep, value = spec.rpartition(":")
    try:
        return (name, float(value)) if sep else (spec, None)
    except ValueError:
        return spec, None


def parse_mix(specs: Sequence[str]) -> dict[str, float] | None:
    """{source: weight} (normalised) from `NAME:WEIGHT` entries, or None when no entry carries
    a weight (the sources are then read one after another, unmixed)."""
    parsed = [_weight(spec) for spec in specs]
    unweighted = [name for name, weight in parsed if weight is None]
    if len(unweighted) == len(parsed):
        return None
    if unweighted:
        raise ValueError(f"give every text source a weight (NAME:WEIGHT) to mix them, or none; missing: {unweighted}")
    weights: dict[str, float] = {}
    for name, weight in parsed:
        if not weight > 0:
            raise ValueError(f"text mix entry {name}:{weight}: the weight must be a positive number")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def window_counts(weights: dict[str, float], n_windows: int) -> dict[str, int]:
    """`n_windows` shared out by weight (largest remainders; the counts sum to `n_windows`)."""
    exact = {name: w * n_windows for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: n_windows - sum(counts.values())]:
        counts[name] += 1
    return counts


def mixed_windows(
    tokenizer,
    sources: dict[str, Sequence[str]],
    weights: dict[str, float],
    n_windows: int,
    context_len: int,
    seed: int = 0,
    split: Split = "train",
    heldout_fraction: float = HELDOUT_FRACTION,
) -> Tensor:
    """[n_windows, context_len] token windows, shuffled, `weights[name]` of them from source
    `name`'s documents of `split` (documents shuffled with `seed`; a source too small for its
    share is cycled, reshuffled, with a warning)."""
    parts = []
    for i, (name, n) in enumerate(window_counts(weights, n_windows).items()):
        docs = list(select_split(sources[name], split, heldout_fraction))
        random.Random(seed + i).shuffle(docs)
        windows = token_windows(tokenizer, docs, context_len)
        if len(windows) == 0:
            raise ValueError(f"text source {name!r} has no full window of {context_len} tokens in its {split!r} split")
        if n > len(windows):
            warnings.warn(f"text source {name!r} holds {len(windows)} windows, fewer than its share {n}: repeating it", stacklevel=2)
        generator = torch.Generator().manual_seed(seed + i)
        order = torch.cat([torch.randperm(len(windows), generator=generator) for _ in range(-(-n // len(windows)))])
        parts.append(windows[order[:n]])
    mixed = torch.cat(parts)
    return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))]


def interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    """One document of each list in turn (so the first few come from every source)."""
    return [doc for group in itertools.zip_longest(*lists) for doc in group if doc is not None]
