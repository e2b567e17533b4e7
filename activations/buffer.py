"""A bounded shuffle buffer over activation rows, mixing tokens across documents.

Semantics match `tf.data`'s shuffle: once the buffer holds `capacity` rows, each output batch
is `batch_size` rows drawn at random from it, and the incoming rows take their slots. Every
row pushed comes out exactly once (after `drain`). Several sites share one set of indices, so
row i of every site's batch is the same token.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

Batch = dict[str, Tensor]


class ShuffleBuffer:
    """Bounded-memory shuffle of `{site: [n, d]}` rows into `{site: [batch_size, d]}` batches."""

    def __init__(self, capacity: int, batch_size: int, seed: int = 0) -> None:
        if batch_size <= 0 or capacity < batch_size:
            raise ValueError(f"need 0 < batch_size <= capacity, got batch_size={batch_size}, capacity={capacity}")
        self.capacity = capacity
        self.batch_size = batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._store: Batch = {}
        self._filled = 0
        self._pending: Batch = {}
        self._draining = False

    def __len__(self) -> int:
        """Rows held (not yet yielded)."""
        return self._filled + self._n_pending()

    def _alloc(self, rows: Batch) -> None:
        self._store = {k: v.new_empty(self.capacity, *v.shape[1:]) for k, v in rows.items()}

    def push(self, rows: Batch) -> Iterator[Batch]:
        """Add rows; yields every batch that became ready."""
        self.add(rows)
        yield from self.ready()

    def add(self, rows: Batch) -> None:
        """Add rows without taking batches out (`ready` yields those)."""
        n = next(iter(rows.values())).shape[0]
        if any(v.shape[0] != n for v in rows.values()):
            raise ValueError("every site must contribute the same number of rows")
        if not self._store:
            self._alloc(rows)
        elif rows.keys() != self._store.keys():
            raise ValueError(f"sites changed: buffer holds {sorted(self._store)}, got {sorted(rows)}")
        free = min(self.capacity - self._filled, n)
        if free:
            for k, v in rows.items():
                self._store[k][self._filled : self._filled + free] = v[:free]
            self._filled += free
        if free == n:
            return
        extra = {k: v[free:] for k, v in rows.items()}
        self._pending = {k: torch.cat([self._pending[k], extra[k]]) for k in extra} if self._pending else extra

    def ready(self) -> Iterator[Batch]:
        """The batches the pending rows already make. The buffer's state is whole at every yield
        (the batch's incoming rows are in, the rest still pending), so it can be saved there."""
        while self._pending and not self._draining and self._n_pending() >= self.batch_size:
            incoming = {k: v[: self.batch_size] for k, v in self._pending.items()}
            self._pending = {k: v[self.batch_size :] for k, v in self._pending.items()}
            if self._n_pending() == 0:
                self._pending = {}
            yield self._swap_out(incoming)

    def _n_pending(self) -> int:
        return next(iter(self._pending.values())).shape[0] if self._pending else 0

    def _swap_out(self, incoming: Batch) -> Batch:
        idx = torch.randperm(self.capacity, generator=self._gen)[: self.batch_size]
        idx = idx.to(next(iter(self._store.values())).device)
        out = {}
        for k, store in self._store.items():
            out[k] = store[idx]
            store[idx] = incoming[k].to(store.dtype)
        return out

    def drain(self, drop_last: bool = False) -> Iterator[Batch]:
        """Yield everything left, shuffled; the last batch may be short unless `drop_last`. Once
        it starts, the rows left wait shuffled in the pending rows (saveable at every yield)."""
        if not self._draining:
            if not self._store:
                return
            rest = {k: v[: self._filled] for k, v in self._store.items()}
            if self._pending:
                rest = {k: torch.cat([rest[k], self._pending[k]]) for k in rest}
            total = rest[next(iter(rest))].shape[0]
            perm = torch.randperm(total, generator=self._gen).to(rest[next(iter(rest))].device)
            self._filled, self._draining = 0, True
            self._pending = {k: v[perm] for k, v in rest.items()} if total else {}
        while (n := self._n_pending()) and (n >= self.batch_size or not drop_last):
            out = {k: v[: self.batch_size] for k, v in self._pending.items()}
            self._pending = {k: v[self.batch_size :] for k, v in self._pending.items()} if n > self.batch_size else {}
            yield out
        self._pending, self._draining = {}, False

    # -- saving and restoring (resume without replay) -----------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, int | bool]]:
        """The rows held and the RNG state as tensors (CPU), the counters as JSON-able values."""
        tensors = {"rng": self._gen.get_state()}
        for k, v in self._store.items():
            tensors[f"store.{k}"] = v[: self._filled].cpu()
        for k, v in self._pending.items():
            tensors[f"pending.{k}"] = v.cpu()
        info = {"capacity": self.capacity, "batch_size": self.batch_size, "filled": self._filled, "draining": self._draining}
        return tensors, info

    def load_state_dict(self, tensors: dict[str, Tensor], info: dict, device: str | torch.device = "cpu") -> None:
        """Continue exactly where `state_dict` was taken: rows, RNG and counters."""
        if (info["capacity"], info["batch_size"]) != (self.capacity, self.batch_size):
            raise ValueError(
                f"saved shuffle buffer has capacity {info['capacity']} and batch size {info['batch_size']}, this one "
                f"{self.capacity} and {self.batch_size}: resume with the settings the run started with"
            )
        self._gen.set_state(tensors["rng"])
        stored = {k[6:]: v for k, v in tensors.items() if k.startswith("store.")}
        self._store = {k: v.new_empty(self.capacity, *v.shape[1:]).to(device) for k, v in stored.items()}
        for k, v in stored.items():
            self._store[k][: len(v)] = v.to(device)
        self._filled, self._draining = int(info["filled"]), bool(info["draining"])
        self._pending = {k[8:]: v.to(device) for k, v in tensors.items() if k.startswith("pending.")}
