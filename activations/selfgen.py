"""A self-generated corpus (FaithfulSAE): documents sampled from the model itself, cached on disk.

Layout: `corpus.jsonl` (one `{"text": ...}` per line, readable by `read_text_files`) and beside
it `corpus.jsonl.manifest.json` (model, seed, sampling parameters, token count, the JSONL's
sha256). Both are written atomically, the manifest last, so a manifest always describes a
complete corpus; `generate_corpus` reuses a corpus whose manifest matches its request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import atomicfs

from .model import LanguageModel
from .text import generated_texts

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True)
class Sampling:
    """How documents are sampled: each starts from BOS alone (FaithfulSAE), one batch per seed."""

    max_new_tokens: int = 256
    """Longest document, in tokens (a document also ends at the model's EOS)."""
    temperature: float = 1.0
    """Softmax temperature; 1 samples the model's own distribution."""
    top_p: float = 1.0
    """Nucleus mass kept; 1 keeps every token."""
    batch_size: int = 32
    """Documents sampled together (part of the seeding: batch i uses seed + i * batch_size)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive integers")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the corpus at `path`, or None when there is no complete, unaltered corpus."""
    path, meta = Path(path), manifest_path(path)
    if not path.is_file() or not meta.is_file():
        return None
    try:
        manifest = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if manifest.get("sha256") != hashlib.sha256(path.read_bytes()).hexdigest():
        return None
    return manifest


def _request(lm: LanguageModel, n_tokens: int, seed: int, sampling: Sampling) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "model": lm.name, "seed": seed, "n_tokens_requested": n_tokens, **asdict(sampling)}


def generate_corpus(
    lm: LanguageModel,
    n_tokens: int,
    path: str | Path,
    seed: int = 0,
    sampling: Sampling | None = None,
    progress: bool = True,
) -> Path:
    """Sample documents from `lm` until they hold `n_tokens` tokens (as its tokenizer re-reads
    them, which is what training windows count) and write them to the JSONL file `path`.
    A corpus already at `path` made with the same model, seed and sampling is reused as is;
    any other file there is replaced. Deterministic for a seed on one machine."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens}")
    sampling = sampling or Sampling()
    path = Path(path)
    request = _request(lm, n_tokens, seed, sampling)
    existing = read_manifest(path)
    if existing is not None and {k: existing.get(k) for k in request} == request:
        return path
    docs: list[str] = []
    total = 0
    texts = generated_texts(
        lm, n_texts=n_tokens, max_new_tokens=sampling.max_new_tokens, batch_size=sampling.batch_size,
        temperature=sampling.temperature, seed=seed, top_p=sampling.top_p,
    )  # lazy, one batch at a time; n_texts only bounds it (every kept document has a token)
    with tqdm(total=n_tokens, unit="tok", desc="generating", disable=not progress) as bar:
        for text in texts:
            n = len(lm.tokenizer.encode(text, add_special_tokens=False))
            if n == 0:
                continue
            docs.append(text)
            total += n
            bar.update(n)
            if total >= n_tokens:
                break
    body = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")
    atomicfs.write_bytes(path, body)
    manifest = {**request, "n_tokens": total, "n_documents": len(docs), "sha256": hashlib.sha256(body).hexdigest()}
    atomicfs.write_json(manifest_path(path), manifest)
    return path
