"""Resume without replay: a live-model stream's position saved beside the run's checkpoints.

One position per run (every site's SAE trains from the same forward passes), in
`RUN/stream_state/` (counters as JSON, the shuffle buffer's rows as safetensors, swapped in
atomically). It is written after all sites' checkpoints of a step, so it is never ahead of them;
when it is behind (a crash between the two writes, or an interrupt while the stream was
changing its buffer) a resume replays only the batches in between, and with no position at all
it replays from the start as before.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import Tensor

import activations
import atomicfs

STREAM_STATE = "stream_state"

Batch = dict[str, Tensor]


class LiveStreamResume:
    """Makes a live stream, saves its position at checkpoints and continues it from one."""

    def __init__(self, make_stream: Callable[[activations.StreamPosition], Iterator[Batch]]) -> None:
        """`make_stream(position)` opens the run's stream (always with the same arguments)."""
        self.make_stream = make_stream
        self.position = activations.StreamPosition()
        self.batches = make_stream(self.position)

    def save(self, run_dir: Path, step: int) -> None:
        """After the checkpoints of `step`: save the position if it is that step's (else keep the
        older one). An interrupt just before a step leaves the stream one batch ahead: that batch
        is saved with it."""
        if self.position.whole and self.position.batches_sent in (step, step + 1):
            self.position.save(Path(run_dir) / STREAM_STATE, used=step)

    def continue_at(self, run_dir: Path, step: int) -> tuple[Iterator[Batch], int]:
        """The stream from the newest saved position at or before `step`, and the batch it starts at."""
        folder = Path(run_dir) / STREAM_STATE
        if atomicfs.newest_complete(folder) is None:
            warnings.warn(f"{run_dir} holds no saved stream position: replaying the {step} batches already trained on",
                          stacklevel=2)
            return self.batches, 0
        position = activations.StreamPosition.load(folder)
        if position.batches_sent > step:
            raise ValueError(
                f"{folder} is at batch {position.batches_sent}, past the checkpoints' step {step}: the run folder "
                f"mixes two runs; delete {folder} to resume by replaying the stream"
            )
        self.position = position
        self.batches = self.make_stream(position)
        return self.batches, position.batches_sent
