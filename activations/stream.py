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
from .sequential import sample_rows
from .position import StreamPosition, WindowCursor, text_digest
from .sites import parse_sites
from .text import HELDOUT_FRACTION, Split, check_split, default_texts, iter_token_windows, select_split

TextSource = Sequence[str] | Iterable[str] | Tensor


def _windows(
    lm: LanguageModel,
    texts: TextSource,
    context_len: int,
    seed: int,
    repeat: bool,
    split: Split = "train",
    heldout_fraction: float = HELDOUT_FRACTION,
    cursor: WindowCursor | None = None,
) -> Iterator[Tensor]:
    """Token windows from the documents of `split`, reshuffling document order each pass when
    the source can repeat. A tensor of token windows is used as given (it has no documents).
    `cursor` is kept at the pass and the windows yielded in it; it starts where it points
    (the windows before are tokenised again, never run through the model)."""
    position = cursor if cursor is not None else WindowCursor()
    start_pass, skip = position.pass_index, position.windows_in_pass

    def passes() -> Iterator[tuple[int, int]]:  # (pass, windows to skip in it), keeping `position` at it
        for p in itertools.count(start_pass) if repeat else range(start_pass, 1):
            position.pass_index, position.windows_in_pass = p, skip if p == start_pass else 0
            yield p, position.windows_in_pass

    def counted(windows: Iterator[Tensor]) -> Iterator[Tensor]:
        for window in windows:
            position.windows_in_pass += 1
            yield window

    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one string: wrap it as [text]")
    if isinstance(texts, Tensor):
        if texts.dim() != 2:
            raise ValueError(f"a tensor text source must be token windows [n, context_len], got {tuple(texts.shape)}")
        if len(texts) == 0:
            raise ValueError("the token-window tensor is empty")
        for p, skipped in passes():
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + p))
            yield from counted(iter(texts[order[skipped:]]))
        return
    if not isinstance(texts, Sequence):  # one-shot iterable: a single pass in its own order
        windows = iter_token_windows(lm.tokenizer, select_split(texts, split, heldout_fraction), context_len)
        yield from counted(itertools.islice(windows, skip, None))
        return
    selected = list(select_split(texts, split, heldout_fraction))
    if not selected:
        raise ValueError(
            f"none of the {len(texts)} documents falls in the {split!r} split (held-out fraction "
            f"{heldout_fraction}); pass more documents or split='all' to use them all"
        )
    for p, skipped in passes():
        if p == 1 and not skipped:
            warnings.warn("stream: the text source is exhausted; starting another pass over it", stacklevel=3)
        docs = list(selected)
        random.Random(seed + p).shuffle(docs)
        n = 0
        for n, window in enumerate(iter_token_windows(lm.tokenizer, docs, context_len), 1):
            if n > skipped:
                position.windows_in_pass += 1
                yield window
        if n == 0:
            raise ValueError(f"the texts ({len(docs)} documents) hold fewer than {context_len} tokens: no window")


def _buffer_size(batch_size: int, n_tokens: int | None) -> int:
    """16 batches, but no more than a quarter of a short run (filling it delays the first batch)."""
    size = 16 * batch_size
    return size if n_tokens is None else max(batch_size, min(size, n_tokens // 4))


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
    split: Split = "train",
    heldout_fraction: float = HELDOUT_FRACTION,
    fill_progress: bool | None = None,
    chat: bool = False,
    sequential: bool = False,
    position: StreamPosition | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Shuffled activation batches: dict site -> [batch_size, d] float32 on the model's device.

    `texts`: None (embedded stdlib corpus), a list of documents, any iterable of documents
    (read once), or a LongTensor of token windows (used as given). Only the documents of
    `split` are read: "train" (default; never a held-out document, see `split_of`), "heldout"
    or "all". With `n_tokens`, exactly that many tokens are yielded, repeating a list/tensor
    source if needed; without it, one pass. BOS, padding and special tokens are dropped unless
    `drop_special=False`. `buffer_tokens` bounds the shuffle buffer (default 16 x batch_size,
    at most a quarter of `n_tokens` but at least one batch); tokens mix across all windows it
    holds. The first batch comes once the buffer is full: `fill_progress` (default: `progress`)
    shows a bar while it fills. `position` (see `StreamPosition`) is kept current at every
    batch yielded; one saved from a stream with the same arguments makes this stream continue
    right after that batch, without running the model on the windows already harvested.

    `chat`: `texts` are conversations (lists of {role, content} messages; None: the built-in
    chat set) under the model's chat template. `sequential` (FAST): whole samples in order, one
    per sequence, cut at `context_len`, never packed together (see activations.sequential).
    A position covers text windows only: chat and sequential streams resume by replay.
    """
    names = [s.name for s in parse_sites(lm, sites)]
    if n_tokens is not None and n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    check_split(split, heldout_fraction)
    capacity = buffer_tokens or _buffer_size(batch_size, n_tokens)
    buffer = ShuffleBuffer(capacity, batch_size, seed=seed)
    if n_tokens is not None:  # a short run needs no more windows per forward than it uses
        lm_batch_size = min(lm_batch_size, max(1, -(-n_tokens // (context_len - 1))))
    samples = chat or sequential
    if samples and position is not None:
        raise ValueError("a stream position covers text windows, not chat or sequential samples (they resume by replay)")
    if not samples:
        texts = default_texts() if texts is None else texts
    position = position if position is not None else StreamPosition()
    text_key = "chat samples" if samples else text_digest(texts if isinstance(texts, Sequence | Tensor) else None)
    settings = {
        "model": lm.name, "sites": names, "texts": text_key,
        "context_len": context_len, "batch_size": batch_size, "n_tokens": n_tokens, "seed": seed,
        "lm_batch_size": lm_batch_size, "capacity": capacity, "drop_special": drop_special, "drop_last": drop_last,
        "split": split, "heldout_fraction": heldout_fraction,
    }
    position.attach(buffer, settings, lm.device)
    cursor = WindowCursor(position.windows.pass_index, position.windows.windows_in_pass)
    if samples:
        rows = sample_rows(
            lm, texts, names, context_len, lm_batch_size, n_tokens is not None, chat, sequential, split,
            heldout_fraction, drop_special,
        )
    else:
        windows = _windows(lm, texts, context_len, seed, n_tokens is not None, split, heldout_fraction, cursor)
        rows = _harvested_rows(lm, windows, names, lm_batch_size, drop_special)
    sent = position.tokens_sent
    fill_progress = progress if fill_progress is None else fill_progress
    with (
        tqdm(total=n_tokens, initial=sent, unit="tok", desc="activations", disable=not progress) as bar,
        tqdm(total=capacity, unit="tok", desc="filling shuffle buffer", disable=not fill_progress or sent > 0,
             leave=False) as fill,
    ):

        def pushed() -> Iterator[Batch]:
            filled = False
            yield from buffer.ready()  # batches a restored buffer already holds
            while True:
                position.whole = True  # running the model changes no state: an interrupt keeps `position` valid
                r = next(rows, None)
                if r is None:
                    break
                position.whole = False
                buffer.add(r)
                position.windows = WindowCursor(cursor.pass_index, cursor.windows_in_pass)
                if not filled:
                    filled = len(buffer) >= capacity
                    fill.update(min(len(buffer), capacity) - fill.n)
                    if filled:
                        fill.close()
                yield from buffer.ready()
            position.whole = False
            yield from buffer.drain(drop_last)

        for batch in itertools.chain(position.take_held(), pushed()):
            if n_tokens is not None and sent + len(next(iter(batch.values()))) > n_tokens:
                batch = {k: v[: n_tokens - sent] for k, v in batch.items()}
            n = len(next(iter(batch.values())))
            sent += n
            bar.update(n)
            if n:
                position.yielded(sent, batch)
                yield batch
                position.whole = False
            if n_tokens is not None and sent >= n_tokens:
                return
