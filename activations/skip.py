"""Skip ahead in a shuffled stream of stored rows by replaying its shuffle on row numbers only.

A `ShuffleBuffer`'s choices depend on its seed and on how many rows arrive when, never on the
rows' values. Pushing row numbers instead of rows therefore reproduces, for no more than a
random permutation per batch, which rows the buffer holds after any number of batches; only
those rows need reading to continue exactly (`CachedActivations.batch_dicts(start_batch=...)`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .buffer import ShuffleBuffer

ROW = "row"


def skip_batches(
    capacity: int, batch_size: int, seed: int, chunks: Sequence[Tensor], n_batches: int, drop_last: bool
) -> tuple[ShuffleBuffer, int]:
    """Replay `n_batches` of a buffer fed `chunks` (1-D row-number tensors, in push order) and
    then drained; returns the buffer of row numbers (`{"row": ...}`) as it stands after them,
    and how many chunks were pushed. Raises ValueError if the chunks give fewer batches."""
    buffer = ShuffleBuffer(capacity, batch_size, seed=seed)
    pushed = 0

    def batches() -> Iterator[None]:
        nonlocal pushed
        for chunk in chunks:
            buffer.add({ROW: chunk})
            pushed += 1
            for _ in buffer.ready():
                yield
        for _ in buffer.drain(drop_last):
            yield

    if n_batches > 0:
        taken = 0
        for _ in batches():
            taken += 1
            if taken == n_batches:
                break
        if taken < n_batches:
            raise ValueError(f"cannot skip {n_batches} batches: the rows make only {taken}")
    return buffer, pushed


def restore_rows(
    numbers: ShuffleBuffer, read: Callable[[Tensor], dict[str, Tensor]], buffer: ShuffleBuffer,
    device: str | torch.device = "cpu",
) -> None:
    """Make `buffer` the real twin of the row-number buffer `numbers`: same RNG and counters,
    holding the rows its numbers stand for (`read(row_numbers)` gives `{site: [n, d]}` in order)."""
    tensors, info = numbers.state_dict()
    real = {"rng": tensors["rng"]}
    for part in ("store", "pending"):
        numbers = tensors.get(f"{part}.{ROW}")
        if numbers is not None:
            real.update({f"{part}.{site}": rows for site, rows in read(numbers).items()})
    buffer.load_state_dict(real, info, device=device)
