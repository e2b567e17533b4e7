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

    def __len__(self) -> int:
        """Rows held (not yet yielded)."""
        return self._filled + (next(iter(self._pending.values())).shape[0] if self._pending else 0)

    def _alloc(self, rows: Batch) -> None:
        self._store = {k: v.new_empty(self.capacity, *v.shape[1:]) for k, v in rows.items()}

    def push(self, rows: Batch) -> Iterator[Batch]:
        """Add rows; yields every batch that became ready."""
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
        pending = {k: torch.cat([self._pending[k], extra[k]]) for k in extra} if self._pending else extra
        n_pending, off = next(iter(pending.values())).shape[0], 0
        while n_pending - off >= self.batch_size:
            yield self._swap_out({k: v[off : off + self.batch_size] for k, v in pending.items()})
            off += self.batch_size
        self._pending = {k: v[off:] for k, v in pending.items()} if off < n_pending else {}

    def _swap_out(self, incoming: Batch) -> Batch:
        idx = torch.randperm(self.capacity, generator=self._gen)[: self.batch_size]
        idx = idx.to(next(iter(self._store.values())).device)
        out = {}
        for k, store in self._store.items():
            out[k] = store[idx]
            store[idx] = incoming[k].to(store.dtype)
        return out

    def drain(self, drop_last: bool = False) -> Iterator[Batch]:
        """Yield everything left, shuffled; the last batch may be short unless `drop_last`."""
        if not self._store:
            return
        rest = {k: v[: self._filled] for k, v in self._store.items()}
        if self._pending:
            rest = {k: torch.cat([rest[k], self._pending[k]]) for k in rest}
        total = rest[next(iter(rest))].shape[0]
        perm = torch.randperm(total, generator=self._gen).to(rest[next(iter(rest))].device)
        self._filled, self._pending = 0, {}
        stop = total - total % self.batch_size if drop_last else total
        for i in range(0, stop, self.batch_size):
            sel = perm[i : i + self.batch_size]
            yield {k: v[sel] for k, v in rest.items()}
