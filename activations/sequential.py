"""Whole-sample sequences (FAST, Li et al. 2025: "Finetuning-aligned Sequential Training"): each
sample, e.g. a chat conversation under the model's template, is one sequence of its own, read in
order, truncated to a maximum length and never packed with another sample; batches are padded.

Token masks. A chat sample's first token (`<|im_start|>` for SmolLM2) is the attention sink, with a
norm ~100x the others at middle layers: it is masked, as BOS is in plain windows, along with the
padding. The template's other special tokens (`<|im_start|>`/`<|im_end|>` opening and closing each
turn) are kept: they are part of every chat the model reads, their norms are ordinary (measured
~180-210 against ~145-215 for words at SmolLM2 layer 15), and FAST trains on them (its steering
result acts on them). Plain-text samples keep the usual rule (`token_mask`: BOS, padding and special
tokens masked).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .chat import Conversation, chat_token_ids, default_conversations, select_conversations
from .hooks import harvest, token_mask
from .model import LanguageModel
from .text import HELDOUT_FRACTION, Split, default_texts, pad_samples, select_split

Batch = dict[str, Tensor]


def sample_batches(
    samples: Iterable[Sequence[int]], max_tokens: int, batch_rows: int, pad_id: int, pool_batches: int = 8
) -> Iterator[tuple[Tensor, Tensor]]:
    """Padded batches of whole samples, one per row, each cut to its first `max_tokens` tokens.
    Samples are read in order, `pool_batches` batches at a time; within such a pool they are
    sorted by length so rows of a batch are alike and little compute goes to padding."""
    if max_tokens < 2 or batch_rows < 1:
        raise ValueError(f"need max_tokens >= 2 and batch_rows >= 1, got {max_tokens} and {batch_rows}")
    samples = iter(samples)
    while pool := [list(s[:max_tokens]) for s in itertools.islice(samples, batch_rows * pool_batches)]:
        pool = [s for s in pool if s]
        pool.sort(key=len)
        for start in range(0, len(pool), batch_rows):
            yield pad_samples(pool[start : start + batch_rows], pad_id)


def packed_windows(samples: Iterable[Sequence[int]], context_len: int) -> Iterator[Tensor]:
    """Block training on whole-sample tokens (the FAST paper's BT(F) baseline): the samples'
    tokens concatenated and cut into windows of `context_len`; a trailing partial window is dropped."""
    pending: list[int] = []
    for s in samples:
        pending.extend(s)
        while len(pending) >= context_len:
            yield torch.tensor(pending[:context_len], dtype=torch.long)
            pending = pending[context_len:]


def chat_token_mask(attention_mask: Tensor) -> Tensor:
    """Bool [B, T] for chat sequences: real tokens except each sequence's first (the attention sink)."""
    keep = attention_mask.bool().clone()
    keep[:, 0] = False
    return keep


def _plain_samples(tokenizer, docs: Iterable[str]) -> Iterator[list[int]]:
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    for doc in docs:
        yield bos + tokenizer.encode(doc, add_special_tokens=False)


def _selected(texts, chat: bool, split: Split, heldout_fraction: float) -> list:
    if isinstance(texts, (str, Tensor)):
        raise TypeError("whole-sample streams read a list of documents (or of conversations with chat=True)")
    if texts is None:
        texts = default_conversations() if chat else default_texts()
    select = select_conversations if chat else select_split
    selected = list(select(texts, split, heldout_fraction))
    if not selected:
        what = "conversations" if chat else "documents"
        raise ValueError(f"none of the {len(texts)} {what} falls in the {split!r} split; pass more or split='all'")
    return selected


def sample_rows(
    lm: LanguageModel,
    texts: Sequence[str] | Sequence[Conversation] | None,
    sites: list[str],
    context_len: int,
    lm_batch_size: int,
    repeat: bool,
    chat: bool = True,
    sequential: bool = True,
    split: Split = "train",
    heldout_fraction: float = HELDOUT_FRACTION,
    drop_special: bool = True,
) -> Iterator[Batch]:
    """Activation rows {site: [n, d]} of whole samples read in order: conversations under the chat
    template (`chat`; texts None is the built-in chat set) or plain documents (BOS first; None is
    the embedded corpus). With
    `sequential` each sample is one sequence of at most `context_len` tokens; without it the
    samples' tokens are packed into windows (block training). Passes repeat in the same order
    while `repeat`."""
    selected = _selected(texts, chat, split, heldout_fraction)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for p in itertools.count() if repeat else range(1):
        if p == 1:
            warnings.warn("stream: the samples are exhausted; starting another pass over them", stacklevel=3)
        samples = chat_token_ids(tok, selected) if chat else _plain_samples(tok, selected)
        if sequential:
            batches = sample_batches(samples, context_len, lm_batch_size, pad)
        else:
            windows = packed_windows(samples, context_len)
            batches = ((torch.stack(c), torch.ones(len(c), context_len, dtype=torch.long))
                       for c in iter(lambda: list(itertools.islice(windows, lm_batch_size)), []))
        n = 0
        for ids, mask in batches:
            ids, mask = ids.to(lm.device), mask.to(lm.device)
            acts = harvest(lm, ids, sites, attention_mask=mask)
            if not drop_special:
                keep = mask.bool()
            else:
                keep = chat_token_mask(mask) if chat else token_mask(lm, ids, mask)
            n += int(keep.sum())
            yield {s: a[keep].float() for s, a in acts.items()}
        if n == 0:
            raise ValueError(f"the {len(selected)} samples hold no token to train on (with context_len {context_len})")
