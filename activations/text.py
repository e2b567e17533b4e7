"""Text sources (embedded corpus, local files, HF datasets, the model's own samples), their
deterministic train / held-out split by document, and tokenisation into fixed-length windows
that start with BOS."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .model import LanguageModel

# Stdlib folders skipped: tests (huge, repetitive), and GUI/demo code with little prose.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "__pycache__"}
_MIN_DOC_CHARS = 40
# A .txt file is cut at blank lines into documents of at least this many characters, so one
# long file still spreads over both splits.
_TXT_DOC_CHARS = 2000

Split = Literal["train", "heldout", "all"]
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.1
"""Share of documents (by hash) reserved for evaluation; training never reads them."""


def split_of(doc: str, heldout_fraction: float = HELDOUT_FRACTION) -> Literal["train", "heldout"]:
    """The split a document belongs to, from a stable hash of its text (sha256, the same on
    every machine and run; identical documents share a split)."""
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "heldout" if h < heldout_fraction * 2**64 else "train"


def check_split(split: str, heldout_fraction: float = HELDOUT_FRACTION) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")


def select_split(
    texts: Iterable[str], split: Split = "train", heldout_fraction: float = HELDOUT_FRACTION
) -> Iterator[str]:
    """The documents of `texts` in `split` ("train", "heldout", or "all" for no filtering), lazily."""
    check_split(split, heldout_fraction)
    for doc in texts:
        if split == "all" or split_of(doc, heldout_fraction) == split:
            yield doc


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))


def iter_default_texts() -> Iterator[str]:
    """Docstrings of the Python standard library, read with `ast` (nothing is imported)."""
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    yield doc


@lru_cache(maxsize=1)
def _all_default_texts() -> tuple[str, ...]:
    return tuple(iter_default_texts())


def default_texts(
    limit: int | None = None, split: Split = "all", heldout_fraction: float = HELDOUT_FRACTION
) -> list[str]:
    """The embedded offline corpus (~5.8k stdlib docstrings, ~376k SmolLM2 tokens), or its
    `split` ("train" ~90%, "heldout" ~10% of documents); `limit` takes the first few."""
    docs = select_split(_all_default_texts() if limit is None else iter_default_texts(), split, heldout_fraction)
    return list(itertools.islice(docs, limit))


def _txt_documents(text: str) -> Iterator[str]:
    """A plain-text file as documents: paragraphs (split at blank lines) joined until each
    holds at least `_TXT_DOC_CHARS` characters."""
    pending: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip():
            continue
        pending.append(paragraph)
        size += len(paragraph)
        if size >= _TXT_DOC_CHARS:
            yield "\n\n".join(pending)
            pending, size = [], 0
    if pending:
        yield "\n\n".join(pending)


def read_text_files(
    paths: Iterable[str | os.PathLike],
    field: str = "text",
    split: Split = "all",
    heldout_fraction: float = HELDOUT_FRACTION,
) -> Iterator[str]:
    """Documents from local files: `.jsonl` yields each line's `field`; any other file is cut
    at blank lines into documents of ~2000+ characters. `split` keeps one part (see `split_of`)."""
    yield from select_split(_read_files(paths, field), split, heldout_fraction)


def _read_files(paths: Iterable[str | os.PathLike], field: str) -> Iterator[str]:
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"Text file {path} does not exist; pass existing .txt or .jsonl files.")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if field not in record:
                        raise ValueError(f"{path}:{n} has no {field!r} field (keys: {sorted(record)}); pass field=...")
                    yield str(record[field])
        else:
            yield from _txt_documents(path.read_text(encoding="utf-8"))


def hf_dataset_texts(name_or_path: str, split: str = "train", field: str = "text", **kwargs: Any) -> Iterator[str]:
    """Documents from a Hugging Face `datasets` dataset (a local `save_to_disk` folder or a
    dataset name available to `load_dataset`, streamed). Requires `pip install datasets`."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("Reading a HF dataset needs the 'datasets' package: pip install datasets") from e
    if Path(name_or_path, "dataset_info.json").is_file() or Path(name_or_path, "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split, streaming=True, **kwargs)
    for row in ds:
        yield str(row[field])


@torch.no_grad()
def generated_texts(
    lm: LanguageModel,
    n_texts: int,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    top_p: float = 1.0,
) -> Iterator[str]:
    """Text sampled from the model itself, starting from BOS (self-generated data, as in
    FaithfulSAE: the SAE then sees the model's own distribution). Batch i is seeded with
    `seed + i * batch_size`; `top_p` < 1 samples from the nucleus only."""
    tok = lm.tokenizer
    if tok.bos_token_id is None:
        raise ValueError(f"{lm.name}'s tokenizer has no BOS token to start sampling from; pass texts instead.")
    model = lm.model.original_model if lm.is_bridge else lm.model
    devices = [lm.device] if lm.device.type == "cuda" else []
    for start in range(0, n_texts, batch_size):
        n = min(batch_size, n_texts - start)
        prompt = torch.full((n, 1), tok.bos_token_id, dtype=torch.long, device=lm.device)
        # generate() has no generator argument: seed a forked RNG so the caller's stays untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + start)
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        yield from tok.batch_decode(out[:, 1:], skip_special_tokens=True)


def iter_token_windows(
    tokenizer: Any, texts: Iterable[str], context_len: int, chunk_docs: int = 256
) -> Iterator[Tensor]:
    """Pack documents (separated by EOS) into windows of `context_len` tokens, each starting
    with BOS followed by `context_len - 1` text tokens; a trailing partial window is dropped."""
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2 (BOS + one token), got {context_len}")
    bos, sep = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:
        bos = sep
    if bos is None:
        raise ValueError("The tokenizer has neither a BOS nor an EOS token to start windows with.")
    body = context_len - 1
    pending: list[int] = []
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, chunk_docs)):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            pending.extend(ids)
            if sep is not None:
                pending.append(sep)
        n_full = len(pending) // body
        for i in range(n_full):
            yield torch.tensor([bos, *pending[i * body : (i + 1) * body]], dtype=torch.long)
        pending = pending[n_full * body :]


def encode_texts(tokenizer: Any, texts: str | list[str], max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-padded ids [N, T], BOS first (as in the windows, when the tokenizer has one), and
    their attention mask [N, T] (1 on real tokens); `max_tokens` keeps each text's first tokens."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("encode_texts needs a string or a non-empty list of strings")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    return pad_samples(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def pad_samples(samples: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [N, T] (T the longest sample) and their attention mask (1 on real tokens)."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def token_windows(tokenizer: Any, texts: Iterable[str], context_len: int) -> Tensor:
    """All windows of `iter_token_windows` as one LongTensor [n_windows, context_len]."""
    windows = list(iter_token_windows(tokenizer, texts, context_len))
    if not windows:
        return torch.empty(0, context_len, dtype=torch.long)
    return torch.stack(windows)
