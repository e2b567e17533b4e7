"""Resume without replay: a stream (or cache) continues from a saved position, running the
model on no window it already harvested, with exactly the batches of an uninterrupted run."""
from __future__ import annotations

import itertools

import pytest
import torch

import activations
import importlib
from activations import StreamPosition

stream_module = importlib.import_module("activations.stream")  # the module, not the function of that name


def _count_harvests(monkeypatch) -> list[int]:
    """Windows per forward pass of the model, appended as the stream runs."""
    windows: list[int] = []
    original = stream_module.harvest

    def counting(lm, ids, sites, *args, **kwargs):
        windows.append(ids.shape[0])
        return original(lm, ids, sites, *args, **kwargs)

    monkeypatch.setattr(stream_module, "harvest", counting)
    return windows


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("n_tokens", [3000, None], ids=["repeating", "one-pass-with-drain"])
def test_stream_continues_from_a_saved_position_without_reharvesting(tiny_lm, tmp_path, monkeypatch, n_tokens):
    docs = activations.default_texts(limit=40)
    sites = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    kwargs = dict(texts=docs, context_len=32, batch_size=64, n_tokens=n_tokens, seed=3, lm_batch_size=4,
                  buffer_tokens=256, progress=False)
    harvested = _count_harvests(monkeypatch)
    full = list(activations.stream(tiny_lm, sites, **kwargs))
    full_windows = sum(harvested)
    assert len(full) > 12
    cuts = [1, 5, len(full) - 3] if n_tokens is None else [1, 5, 23, len(full) - 1]  # 23: past the first pass
    for cut in cuts:
        harvested.clear()
        position = StreamPosition()
        first = list(itertools.islice(activations.stream(tiny_lm, sites, position=position, **kwargs), cut))
        position.save(tmp_path / f"at-{cut}")
        resumed = StreamPosition.load(tmp_path / f"at-{cut}")
        assert resumed.batches_sent == cut and resumed.windows_in_pass > 0
        rest = list(activations.stream(tiny_lm, sites, position=resumed, **kwargs))
        assert _same(first + rest, full), cut
        assert sum(harvested) == full_windows, "the resumed stream ran the model on a window already harvested"
