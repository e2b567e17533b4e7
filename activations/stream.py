"""`stream`: text -> token windows -> hooked forwards -> shuffled [batch, d] activation batches."""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .buffer import Batch, ShuffleBuffer
from .hooks import harvest, token_mask
from .model import LanguageModel
from .sites import parse_sites
from .text import default_texts, iter_token_windows

TextSource = Sequence[str] | Iterable[str] | Tensor


def _windows(lm: LanguageModel, texts: TextSource, context_len: int, seed: int, repeat: bool) -> Iterator[Tensor]:
    """Token windows from the source, reshuffling document order each pass when it can repeat."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one string: wrap it as [text]")
    if isinstance(texts, Tensor):
        if texts.dim() != 2:
            raise ValueError(f"a tensor text source must be token windows [n, context_len], got {tuple(texts.shape)}")
        if len(texts) == 0:
            raise ValueError("the token-window tensor is empty")
        for p in itertools.count() if repeat else range(1):
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + p))
            yield from texts[order]
        return
    if not isinstance(texts, Sequence):  # one-shot iterable: a single pass in its own order
        yield from iter_token_windows(lm.tokenizer, texts, context_len)
        return
    for p in itertools.count() if repeat else range(1):
        if p == 1:
            warnings.warn("stream: the text source is exhausted; starting another pass over it", stacklevel=3)
        docs = list(texts)
        random.Random(seed + p).shuffle(docs)
        n = 0
        for n, window in enumerate(iter_token_windows(lm.tokenizer, docs, context_len), 1):
            yield window
        if n == 0:
            raise ValueError(f"the texts ({len(docs)} documents) hold fewer than {context_len} tokens: no window")


def _harvested_rows(
    lm: LanguageModel, windows: Iterator[Tensor], sites: list[str], lm_batch_size: int, drop_special: bool
) -> Iterator[Batch]:
    while chunk := list(itertools.islice(windows, lm_batch_size)):
        ids = torch.stack(chunk).to(lm.device)
        acts = harvest(lm, ids, sites)
        keep = token_mask(lm, ids) if drop_special else torch.ones_like(ids, dtype=torch.bool)
        yield {s: a[keep].float() for s, a in acts.items()}


def stream(
    lm: LanguageModel,
    sites: str | list[str],
    texts: TextSource | None = None,
    context_len: int = 128,
    batch_size: int = 4096,
    n_tokens: int | None = None,
    seed: int = 0,
    lm_batch_size: int = 32,
    buffer_tokens: int | None = None,
    drop_special: bool = True,
    drop_last: bool = False,
    progress: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Shuffled activation batches: dict site -> [batch_size, d] float32 on the model's device.

    `texts`: None (embedded stdlib corpus), a list of documents, any iterable of documents
    (read once), or a LongTensor of token windows. With `n_tokens`, exactly that many tokens
    are yielded, repeating a list/tensor source if needed; without it, one pass. BOS, padding
    and special tokens are dropped unless `drop_special=False`. `buffer_tokens` (default
    16 x batch_size) bounds the shuffle buffer; tokens mix across all windows it holds.
    """
    names = [s.name for s in parse_sites(lm, sites)]
    if n_tokens is not None and n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    texts = default_texts() if texts is None else texts
    buffer = ShuffleBuffer(buffer_tokens or 16 * batch_size, batch_size, seed=seed)
    windows = _windows(lm, texts, context_len, seed, repeat=n_tokens is not None)
    rows = _harvested_rows(lm, windows, names, lm_batch_size, drop_special)
    sent = 0
    with tqdm(total=n_tokens, unit="tok", desc="activations", disable=not progress) as bar:
        batches = itertools.chain(itertools.chain.from_iterable(map(buffer.push, rows)), buffer.drain(drop_last))
        for batch in batches:
            if n_tokens is not None and sent + len(next(iter(batch.values()))) > n_tokens:
                batch = {k: v[: n_tokens - sent] for k, v in batch.items()}
            n = len(next(iter(batch.values())))
            if n:
                yield batch
            sent += n
            bar.update(n)
            if n_tokens is not None and sent >= n_tokens:
                return
