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
        assert resumed.batches_sent == cut and resumed.windows.windows_in_pass > 0
        rest = list(activations.stream(tiny_lm, sites, position=resumed, **kwargs))
        assert _same(first + rest, full), cut
        assert sum(harvested) == full_windows, "the resumed stream ran the model on a window already harvested"


def test_an_interrupt_while_the_model_runs_leaves_a_position_that_resumes_exactly(tiny_lm, tmp_path, monkeypatch):
    kwargs = dict(texts=activations.default_texts(limit=40), context_len=32, batch_size=64, n_tokens=2000, seed=1,
                  lm_batch_size=4, buffer_tokens=256, progress=False)
    site = ["blocks.1.hook_resid_post"]
    full = list(activations.stream(tiny_lm, site, **kwargs))
    original = stream_module.harvest
    calls = []

    def interrupted(*args, **kw):  # Ctrl-C in the middle of the 9th forward pass
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(stream_module, "harvest", interrupted)
    position, got = StreamPosition(), []
    with pytest.raises(KeyboardInterrupt):
        got.extend(activations.stream(tiny_lm, site, position=position, **kwargs))
    assert position.whole and position.batches_sent == len(got) > 0
    position.save(tmp_path / "pos")
    monkeypatch.setattr(stream_module, "harvest", original)
    rest = list(activations.stream(tiny_lm, site, position=StreamPosition.load(tmp_path / "pos"), **kwargs))
    assert _same(got + rest, full)

    # Stopped while the buffer changes, the position is partial: saving it is refused, not done wrong.
    monkeypatch.setattr(activations.ShuffleBuffer, "_swap_out", lambda self, rows: (_ for _ in ()).throw(KeyboardInterrupt))
    position = StreamPosition()
    with pytest.raises(KeyboardInterrupt):
        list(activations.stream(tiny_lm, site, position=position, **kwargs))
    with pytest.raises(RuntimeError, match="cannot be saved"):
        position.save(tmp_path / "partial")


@pytest.fixture
def small_cache(tiny_lm, tmp_path, monkeypatch):
    """A cache of 900 rows in 5 shards (the last shorter) and two sites; column 0 of a row is its
    number (the rows stand in for the model's, so that every row is told apart)."""
    rows = torch.randn(900, tiny_lm.d_model)
    rows[:, 0] = torch.arange(900)
    fake_stream = lambda lm, sites, **kw: ({s: rows[i : i + 100] * (1 + j) for j, s in enumerate(sites)} for i in range(0, 900, 100))
    monkeypatch.setattr(importlib.import_module("activations.cache"), "stream", fake_stream)
    sites = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    return activations.CachedActivations(activations.write_cache(tiny_lm, sites, tmp_path / "cache", shard_tokens=200))


@pytest.mark.parametrize("drop_last", [False, True])
def test_cache_starts_at_a_batch_reading_only_rows_not_yet_yielded(small_cache, monkeypatch, drop_last):
    cache = small_cache
    kwargs = dict(batch_size=32, seed=5, buffer_tokens=160, drop_last=drop_last)
    full = list(cache.batch_dicts(epochs=2, **kwargs))
    for cut in (1, 9, len(full) // 2 - 1, len(full) // 2, len(full) // 2 + 3, len(full) - 1):  # both epochs, and in the drain
        assert _same(list(cache.batch_dicts(epochs=2, start_batch=cut, **kwargs)), full[cut:]), cut

    site = cache.sites[0]
    read: set[int] = set()
    read_rows, read_shard = type(cache).read_rows, type(cache).read_shard
    bounds = list(itertools.accumulate((s["n_tokens"] for s in cache.manifest["shards"]), initial=0))

    def recording_rows(self, rows, sites=None):
        read.update(rows.tolist())
        return read_rows(self, rows, sites)

    def recording_shard(self, index, sites=None):
        read.update(range(bounds[index], bounds[index + 1]))
        return read_shard(self, index, sites)

    monkeypatch.setattr(type(cache), "read_rows", recording_rows)
    monkeypatch.setattr(type(cache), "read_shard", recording_shard)
    one_epoch = list(cache.batch_dicts(epochs=1, **kwargs))
    for cut in (3, 11, len(one_epoch) - 2):
        read.clear()
        rest = list(cache.batch_dicts(epochs=1, start_batch=cut, **kwargs))
        assert _same(rest, one_epoch[cut:])
        skipped = {int(n) for batch in one_epoch[:cut] for n in batch[site][:, 0]}
        assert read == set(range(900)) - skipped, "rows of skipped batches were read (or rows went missing)"
