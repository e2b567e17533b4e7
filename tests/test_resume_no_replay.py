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
        used = cut - 1 if cut == 5 else cut  # at 5, the consumer stopped before using the batch it took
        position.save(tmp_path / f"at-{cut}", used=used)
        resumed = StreamPosition.load(tmp_path / f"at-{cut}")
        assert resumed.batches_sent == used and resumed.windows.windows_in_pass > 0
        rest = list(activations.stream(tiny_lm, sites, position=resumed, **kwargs))
        assert _same(first[:used] + rest, full), cut
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
    swap_out, swaps = activations.ShuffleBuffer._swap_out, []

    def interrupted_swap(self, rows):  # the 3rd batch taken from the buffer, right after the 2nd was yielded
        swaps.append(1)
        if len(swaps) == 3:
            raise KeyboardInterrupt
        return swap_out(self, rows)

    monkeypatch.setattr(activations.ShuffleBuffer, "_swap_out", interrupted_swap)
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


def test_cli_resume_of_a_live_model_run_is_bit_identical_and_harvests_no_window_twice(tmp_path, tiny_lm, monkeypatch):
    """Two sites from one live stream, interrupted at step 13 (after a periodic save at 10),
    resumed: same weights as the uninterrupted run, and the model runs only on new windows."""
    import sae
    from sae.app.cli import main
    from sae.app.resume import STREAM_STATE

    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(activations.default_texts(limit=30)))  # a few passes over these in the run
    sites = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    args = ["train", "--model", str(model_dir), "--sites", *sites, "--texts", str(docs), "--n-tokens", "3000",
            "--batch-size", "128", "--context-len", "32", "--expansion-factor", "2", "--k", "4", "--no-wandb",
            "--log-every", "5", "--checkpoint-every", "10"]
    harvested = _count_harvests(monkeypatch)
    assert main([*args, "--out-dir", str(tmp_path / "full")]) == 0
    full_windows = sum(harvested)
    harvested.clear()

    original = sae.Trainer.train_step

    def interrupt_at_13(self, x):
        if self.step == 13:
            raise KeyboardInterrupt
        original(self, x)

    monkeypatch.setattr(sae.Trainer, "train_step", interrupt_at_13)
    assert main([*args, "--out-dir", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(sae.Trainer, "train_step", original)
    cut_windows = sum(harvested)
    assert StreamPosition.load(tmp_path / "cut" / STREAM_STATE).batches_sent == 13
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-wandb"]) == 0
    assert sum(harvested) - cut_windows > 0 and sum(harvested) == full_windows, "the resume re-ran harvested windows"
    for site in sites:
        full, resumed = sae.load(tmp_path / "full" / site), sae.load(tmp_path / "cut" / site)
        for name, tensor in full.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], tensor), (site, name)


def test_cli_resume_from_a_cache_is_bit_identical_and_reads_only_rows_still_due(small_cache, tmp_path, monkeypatch):
    import sae
    from sae.app.cli import main

    args = ["train", "--activations", str(small_cache.path), "--n-tokens", "1600", "--batch-size", "64", "--k", "4",
            "--expansion-factor", "2", "--no-wandb", "--log-every", "5"]
    assert main([*args, "--out-dir", str(tmp_path / "full")]) == 0
    original = sae.Trainer.train_step

    def interrupt_at_17(self, x):  # in the second epoch (14 batches of 64 per epoch)
        if self.step == 17:
            raise KeyboardInterrupt
        original(self, x)

    monkeypatch.setattr(sae.Trainer, "train_step", interrupt_at_17)
    assert main([*args, "--out-dir", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(sae.Trainer, "train_step", original)
    rows_read = []
    read_rows, read_shard = type(small_cache).read_rows, type(small_cache).read_shard
    monkeypatch.setattr(type(small_cache), "read_rows", lambda self, rows, sites=None: rows_read.append(len(rows)) or read_rows(self, rows, sites))
    monkeypatch.setattr(type(small_cache), "read_shard", lambda self, i, sites=None: rows_read.append(self.manifest["shards"][i]["n_tokens"]) or read_shard(self, i, sites))
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-wandb"]) == 0
    # Nothing of the first epoch, nor of the 3 batches of the second already trained on: its other rows only.
    assert sum(rows_read) == 900 - (17 - 14) * 64
    for site in small_cache.sites:
        full, resumed = sae.load(tmp_path / "full" / site), sae.load(tmp_path / "cut" / site)
        for name, tensor in full.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], tensor), (site, name)
