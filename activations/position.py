"""Where a `stream` is, as a small saveable state, so a resumed run continues without replay.

A stream given a `StreamPosition` keeps it current: which pass over the documents it is in, how
many token windows of that pass it has harvested, the tokens and batches it has yielded, and its
shuffle buffer (rows, pending rows, RNG). Saved at a yielded batch and passed to a new `stream`
with the same settings, it continues with exactly the batches the first stream would have
yielded next: the windows already harvested are tokenised again (cheap) but never re-run
through the model.

```python
position = activations.StreamPosition()
batches = activations.stream(lm, sites, n_tokens=10**6, position=position)
...                                   # after taking some batches
position.save("run/stream_state")
later = activations.stream(lm, sites, n_tokens=10**6, position=activations.StreamPosition.load("run/stream_state"))
```

The saved buffer holds up to `capacity` rows per site in float32 (the default 16 x 4096 rows
of d=576 are ~150 MB per site).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import atomicfs

from .buffer import ShuffleBuffer

STATE_JSON = "stream_state.json"
BUFFER_TENSORS = "shuffle_buffer.safetensors"
FORMAT_VERSION = 1


@dataclass
class WindowCursor:
    """The windows a stream has taken so far: its pass over the documents and windows of that pass."""

    pass_index: int = 0
    windows_in_pass: int = 0


class StreamPosition:
    """A stream's position; see the module docstring. Fresh (`StreamPosition()`) or `load`ed."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        """What fixes the stream's sequence (model, sites, text digest, sizes, seed); a restore checks it."""
        self.windows = WindowCursor()
        """Pass over the documents (their order is shuffled with seed + pass) and the windows of it
        whose rows are in the buffer or yielded."""
        self.tokens_sent = 0
        self.batches_sent = 0
        self.whole = True
        """True when counters and buffer agree: while the stream waits at a yielded batch or runs the
        model on the next windows (an interrupt there keeps it valid); False while it changes them."""
        self.buffer: ShuffleBuffer | None = None
        self.last_batch: dict[str, Tensor] | None = None
        """The batch yielded last (a reference): saved when its consumer stopped before using it."""
        self._saved_buffer: tuple[dict[str, Tensor], dict[str, Any]] | None = None
        self._held: dict[str, Tensor] | None = None

    def attach(self, buffer: ShuffleBuffer, settings: dict[str, Any], device: str | torch.device) -> None:
        """Called by `stream` as it starts: check a loaded position's settings and refill `buffer`."""
        settings = json.loads(json.dumps(settings))  # the form it takes in the JSON file
        if self.settings and self.settings != settings:
            changed = {k: (self.settings.get(k), settings.get(k)) for k in settings.keys() | self.settings.keys()
                       if self.settings.get(k) != settings.get(k)}
            raise ValueError(
                f"the saved stream position belongs to a stream with other settings (saved, now: {changed}); "
                "resume with the data settings the run started with"
            )
        self.settings, self.buffer, self.whole = settings, buffer, False
        if self._saved_buffer is not None:
            buffer.load_state_dict(*self._saved_buffer, device=device)
            self._saved_buffer = None
        if self._held is not None:
            self._held = {k: v.to(device) for k, v in self._held.items()}

    def yielded(self, tokens_sent: int, batch: dict[str, Tensor]) -> None:
        """Called by `stream` just before it yields `batch`."""
        self.tokens_sent = tokens_sent
        self.batches_sent += 1
        self.last_batch = batch
        self.whole = True

    def take_held(self) -> Iterator[dict[str, Tensor]]:
        """The batch a saved position kept because its consumer had not used it (yielded first)."""
        held, self._held = self._held, None
        if held is not None:
            yield held

    def save(self, folder: str | os.PathLike, used: int | None = None) -> Path:
        """Write the position (counters as JSON, buffer as safetensors), swapped in atomically.
        `used`: batches the consumer has used, the batches yielded (default) or one fewer, when it
        stopped before using the last one; that batch is then saved and yielded first on resume."""
        if self.buffer is None or not self.whole:
            raise RuntimeError("the stream was stopped while changing its position: it cannot be saved now")
        used = self.batches_sent if used is None else used
        if used not in (self.batches_sent, self.batches_sent - 1):
            raise ValueError(f"the stream has yielded {self.batches_sent} batches; it cannot be saved as having {used} used")
        tensors, buffer_info = self.buffer.state_dict()
        held = used < self.batches_sent
        tokens_sent = self.tokens_sent
        if held:  # counted again when it is yielded again
            tensors.update({f"held.{k}": v.cpu() for k, v in self.last_batch.items()})
            tokens_sent -= next(iter(self.last_batch.values())).shape[0]
        info = {
            "format_version": FORMAT_VERSION, "settings": self.settings, "pass_index": self.windows.pass_index,
            "windows_in_pass": self.windows.windows_in_pass, "tokens_sent": tokens_sent,
            "batches_sent": used, "buffer": buffer_info, "held_batch": held,
        }

        def build(tmp: Path) -> None:
            with atomicfs.atomic_path(tmp / BUFFER_TENSORS) as path:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
            atomicfs.write_json(tmp / STATE_JSON, info)

        return atomicfs.replace_dir(folder, build)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> StreamPosition:
        """A position saved by `save` (the newest complete copy of the folder)."""
        found = atomicfs.newest_complete(folder)
        if found is None or not (found / STATE_JSON).is_file():
            raise FileNotFoundError(f"no saved stream position at {folder}")
        try:
            info = json.loads((found / STATE_JSON).read_text())
            tensors = load_file(str(found / BUFFER_TENSORS))
        except (json.JSONDecodeError, SafetensorError, OSError) as err:
            raise ValueError(
                f"the stream position in {found} is corrupt ({err}); delete that folder to resume by replaying the stream"
            ) from err
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{found / STATE_JSON} has format_version {info.get('format_version')}; this reads {FORMAT_VERSION}")
        position = cls()
        position.settings = info["settings"]
        position.windows = WindowCursor(info["pass_index"], info["windows_in_pass"])
        position.tokens_sent, position.batches_sent = info["tokens_sent"], info["batches_sent"]
        held = {k[5:]: tensors.pop(k) for k in list(tensors) if k.startswith("held.")}
        position._held = held or None
        position._saved_buffer = (tensors, info["buffer"])
        return position


def text_digest(texts: Sequence[str] | Tensor | None) -> str:
    """A short fingerprint of a text source (documents or token windows), to check a restore."""
    if texts is None:
        return "one-shot iterable"
    digest = hashlib.sha256()
    if isinstance(texts, Tensor):
        digest.update(str(tuple(texts.shape)).encode())
        digest.update(texts.contiguous().cpu().numpy().tobytes())
    else:
        for doc in texts:
            digest.update(doc.encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]
