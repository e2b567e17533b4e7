"""On-disk activation cache: safetensors shards plus a JSON manifest with checksums.

Layout of a cache folder::

    manifest.json              model, sites, d, dtype, context length, token count, text split, shards
    shard_00000.safetensors    one [n, d] tensor per site; row i of every site is the same token

`write_cache` fills it from `stream` (so shards are already mixed across documents);
`CachedActivations(path).batches(...)` reads it back memory-mapped, reshuffled, with
no model forward. Truncated or altered shards are detected (size, then sha256).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

import atomicfs

from .buffer import Batch, ShuffleBuffer
from .model import LanguageModel
from .skip import restore_rows, skip_batches
from .stream import TextSource, stream
from .text import HELDOUT_FRACTION, Split

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(ValueError):
    """A cache folder is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_shard(folder: Path, index: int, rows: Batch, dtype: torch.dtype) -> dict[str, Any]:
    name = f"shard_{index:05d}.safetensors"
    data = save({k: v.to("cpu", dtype).contiguous() for k, v in rows.items()})
    atomicfs.write_bytes(folder / name, data)
    n = next(iter(rows.values())).shape[0]
    return {"file": name, "n_tokens": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_cache(
    lm: LanguageModel,
    sites: str | list[str],
    out: str | os.PathLike,
    n_tokens: int | None = None,
    texts: TextSource | None = None,
    context_len: int = 128,
    shard_tokens: int = 65536,
    dtype: str = "float32",
    seed: int = 0,
    lm_batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    split: Split = "train",
    heldout_fraction: float = HELDOUT_FRACTION,
) -> Path:
    """Harvest activations at `sites` into a cache folder at `out`; returns its path.

    Arguments as for `stream` (by default only the "train" split of the documents is read, so
    a cache never holds held-out text); `dtype` (float32, float16, bfloat16) is the storage type.
    The folder appears only when complete (written beside it, then swapped in): with
    `overwrite`, the old cache stays until the new one is whole.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    sites = [sites] if isinstance(sites, str) else list(sites)

    def build(tmp: Path) -> None:
        shards: list[dict[str, Any]] = []
        pending: list[Batch] = []
        n_pending = 0

        def flush(upto: int) -> None:
            nonlocal pending, n_pending
            merged = {s: torch.cat([p[s] for p in pending]) for s in sites}
            shards.append(_write_shard(tmp, len(shards), {s: v[:upto] for s, v in merged.items()}, _DTYPES[dtype]))
            rest = {s: v[upto:] for s, v in merged.items()}
            n_pending -= upto
            pending = [rest] if n_pending else []

        rows_iter = stream(
            lm, sites, texts=texts, context_len=context_len, batch_size=min(4096, shard_tokens),
            n_tokens=n_tokens, seed=seed, lm_batch_size=lm_batch_size, progress=progress, split=split,
            heldout_fraction=heldout_fraction,
        )
        for rows in rows_iter:
            pending.append(rows)
            n_pending += next(iter(rows.values())).shape[0]
            while n_pending >= shard_tokens:
                flush(shard_tokens)
        if n_pending:
            flush(n_pending)
        if not shards:
            raise ValueError("no tokens were harvested: the text source is empty or shorter than one window")
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": lm.name,
            "sites": sites,
            "d": lm.d_model,
            "dtype": dtype,
            "context_len": context_len,
            "n_tokens": sum(s["n_tokens"] for s in shards),
            "special_tokens_dropped": True,
            # Token-window tensors have no documents to split: they are stored as given.
            "split": "token windows as given" if isinstance(texts, Tensor) else split,
            "heldout_fraction": heldout_fraction,
            "shards": shards,
        }
        atomicfs.write_json(tmp / MANIFEST, manifest)

    atomicfs.replace_dir(out, build)
    return out


class CachedActivations:
    """Read a cache folder written by `write_cache` (checks shard sizes on open).

    `verify=True` also checks each shard's sha256 before its first use in an iteration.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        # A cache whose --overwrite was killed mid-swap is read from its newest complete copy.
        self.path = atomicfs.newest_complete(path) or Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise CacheError(
                f"{manifest_path} not found: {self.path} is not an activation cache "
                "(create one with `sae cache ...` or activations.cache.write_cache)"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{manifest_path} is not valid JSON ({e}); rebuild the cache") from e
        if not isinstance(self.manifest, dict) or self.manifest.get("format_version") != FORMAT_VERSION:
            version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
            raise CacheError(f"{manifest_path} has format_version {version}, "
                             f"this reader needs {FORMAT_VERSION}; rebuild the cache")
        self.verify = verify
        self._verified: set[str] = set()
        self._check_manifest(manifest_path)

    def _check_manifest(self, manifest_path: Path) -> None:
        """Fail on open, naming the problem, when the manifest and the shards disagree."""
        missing = [k for k in ("model", "sites", "d", "n_tokens", "shards") if k not in self.manifest]
        if missing:
            raise CacheError(f"{manifest_path} lacks {missing}; rebuild the cache")
        sites = self.manifest["sites"]
        if not sites or not all(isinstance(s, str) and s for s in sites) or len(set(sites)) != len(sites):
            raise CacheError(f"{manifest_path}: 'sites' must be distinct non-empty names, got {sites!r}")
        total = 0
        for shard in self.manifest["shards"]:
            name = shard["file"]
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise CacheError(f"{manifest_path}: shard file {name!r} is not a plain file name inside the cache")
            file = self.path / name
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                raise CacheError(
                    f"{file} is {'missing' if size is None else f'{size} bytes'}, the manifest says "
                    f"{shard['bytes']}: the cache is truncated or incomplete; delete {self.path} and rebuild it"
                )
            try:
                with safe_open(str(file), framework="pt") as f:
                    shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            except (SafetensorError, OSError) as e:
                raise CacheError(f"{file} is not a readable safetensors shard ({e}); rebuild the cache") from e
            expected = (shard["n_tokens"], self.d)
            wrong = {s: shapes.get(s) for s in sites if shapes.get(s) != expected}
            if wrong:
                raise CacheError(
                    f"{file} does not hold the manifest's sites as [{expected[0]}, {expected[1]}] tensors "
                    f"(found {wrong}; the shard has {sorted(shapes)}): manifest and shards disagree; rebuild the cache"
                )
            total += shard["n_tokens"]
        if total != self.n_tokens:
            raise CacheError(f"{manifest_path} says n_tokens={self.n_tokens} but its shards hold {total}; rebuild the cache")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    def __len__(self) -> int:
        return self.n_tokens

    def _check(self, shard: dict[str, Any]) -> Path:
        file = self.path / shard["file"]
        if self.verify and shard["file"] not in self._verified:
            if _sha256(file) != shard["sha256"]:
                raise CacheError(
                    f"{file} does not match its sha256 in {self.path / MANIFEST}: the shard was altered "
                    f"or corrupted; delete {self.path} and rebuild it"
                )
            self._verified.add(shard["file"])
        return file

    def _sites(self, sites: str | list[str] | None) -> list[str]:
        if sites is None:
            return self.sites
        names = [sites] if isinstance(sites, str) else list(sites)
        unknown = [s for s in names if s not in self.manifest["sites"]]
        if unknown:
            raise ValueError(f"{self.path} holds no site {unknown}; it has {self.sites}")
        return names

    def read_shard(self, index: int, sites: str | list[str] | None = None) -> Batch:
        """One shard's rows {site: [n, d] float32}, in stored order (memory-mapped read)."""
        file = self._check(self.manifest["shards"][index])
        with safe_open(str(file), framework="pt") as f:
            return {s: f.get_tensor(s).float() for s in self._sites(sites)}

    def read_rows(self, rows: Tensor, sites: str | list[str] | None = None) -> Batch:
        """Rows by number (counting through the shards in manifest order), {site: [len(rows), d]
        float32} in the order given; reads those rows only (one slice per run of neighbours)."""
        names = self._sites(sites)
        sizes = torch.tensor([s["n_tokens"] for s in self.manifest["shards"]])
        starts = torch.cumsum(sizes, 0) - sizes
        out = {s: torch.empty(len(rows), self.d) for s in names}
        shard_of = torch.bucketize(rows, starts, right=True) - 1
        for index in shard_of.unique().tolist():
            where = (shard_of == index).nonzero().squeeze(1)
            local, order = (rows[where] - starts[index]).sort()
            breaks = ((local[1:] != local[:-1] + 1).nonzero().squeeze(1) + 1).tolist()
            runs = list(zip([0, *breaks], [*breaks, len(local)]))
            with safe_open(str(self._check(self.manifest["shards"][index])), framework="pt") as f:
                for s in names:
                    part = f.get_slice(s)
                    out[s][where[order]] = torch.cat([part[int(local[a]) : int(local[b - 1]) + 1] for a, b in runs]).float()
        return out

    def batch_dicts(
        self,
        batch_size: int,
        sites: str | list[str] | None = None,
        seed: int = 0,
        epochs: int = 1,
        buffer_tokens: int | None = None,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        start_batch: int = 0,
    ) -> Iterator[Batch]:
        """Shuffled batches {site: [batch_size, d] float32}; every token once per epoch.

        Shards are visited in a random order and mixed through a shuffle buffer of
        `buffer_tokens` rows (default: two shards' worth, at least 4 batches). `start_batch`
        continues at that batch of the same sequence, reading no row of the batches before it
        (the shuffle is replayed on row numbers; only the rows then in the buffer are read).
        """
        names = self._sites(sites)
        shards = self.manifest["shards"]
        capacity = buffer_tokens or max(2 * max(s["n_tokens"] for s in shards), 4 * batch_size)
        per_epoch = self.n_tokens // batch_size if drop_last else -(-self.n_tokens // batch_size)
        first_epoch, skip = divmod(start_batch, per_epoch) if per_epoch else (0, 0)
        for epoch in range(first_epoch, epochs):
            gen = torch.Generator().manual_seed(seed + epoch)
            buffer = ShuffleBuffer(capacity, batch_size, seed=seed + epoch)
            order = torch.randperm(len(shards), generator=gen).tolist()
            pushed = 0
            if epoch == first_epoch and skip:
                bounds = list(itertools.accumulate((s["n_tokens"] for s in shards), initial=0))
                chunks = [torch.arange(bounds[i], bounds[i + 1]) for i in order]
                numbers, pushed = skip_batches(capacity, batch_size, seed + epoch, chunks, skip, drop_last)
                restore_rows(numbers, lambda rows: self.read_rows(rows, names), buffer)
            for batch in buffer.ready():  # batches the restored buffer already holds
                yield {k: v.to(device) for k, v in batch.items()}
            for index in order[pushed:]:
                for batch in buffer.push(self.read_shard(index, names)):
                    yield {k: v.to(device) for k, v in batch.items()}
            for batch in buffer.drain(drop_last):
                yield {k: v.to(device) for k, v in batch.items()}

    def batches(
        self,
        batch_size: int,
        site: str | None = None,
        seed: int = 0,
        epochs: int = 1,
        buffer_tokens: int | None = None,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> Iterator[Tensor]:
        """Shuffled [batch_size, d] float32 tensors of one site (the trainer's input).

        `site` may be omitted when the cache holds a single site.
        """
        if site is None:
            if len(self.sites) != 1:
                raise ValueError(f"{self.path} holds several sites {self.sites}; pass site=...")
            site = self.sites[0]
        for batch in self.batch_dicts(batch_size, site, seed, epochs, buffer_tokens, drop_last, device):
            yield batch[site]
