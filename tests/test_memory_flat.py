"""A longer `sae train` run holds no more memory than a shorter one: once warmed up, neither the
live tensors (torch's memory, found through the garbage collector) nor the Python objects grow
with the steps, from a live model or from a cache. The RSS figure itself is measured by
benchmarks/memory.py, not here (RSS thresholds would be flaky)."""
from __future__ import annotations

import gc

import pytest
import torch

import sae
from activations.cache import write_cache
from sae.app.cli import main

SITE = "blocks.1.hook_resid_post"
BATCH = 64
STEPS = 64
# From the second measurement on, every periodic path (log every 4, eval every 8, the shuffle
# buffer's fill) has run several times, so one-off lazy caches are built.
MEASURE_AT = (32, STEPS)
ROW_BYTES = 64 * 4  # the tiny model's d_model, fp32


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage that Python can reach."""
    storages = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some module proxies warn about.
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure_steps(monkeypatch) -> dict[int, tuple[int, int]]:
    """Make `Trainer.train_step` record (tensor bytes, Python objects) at the MEASURE_AT steps."""
    seen: dict[int, tuple[int, int]] = {}
    original = sae.Trainer.train_step

    def step(self, x):
        original(self, x)
        if self.step in MEASURE_AT:
            gc.collect()
            seen[self.step] = (live_tensor_bytes(), len(gc.get_objects()))

    monkeypatch.setattr(sae.Trainer, "train_step", step)
    return seen


def train(args: list[str], tmp_path, monkeypatch) -> dict[int, tuple[int, int]]:
    seen = measure_steps(monkeypatch)
    assert main([
        "train", "--sites", SITE, "--n-tokens", str(STEPS * BATCH), "--batch-size", str(BATCH),
        "--expansion-factor", "2", "--k", "8", "--log-every", "4", "--eval-every", "8", "--no-wandb",
        "--out-dir", str(tmp_path / "run"), *args,
    ]) == 0
    assert sorted(seen) == list(MEASURE_AT)
    return seen


def assert_flat(seen: dict[int, tuple[int, int]]) -> None:
    (tensors_early, objects_early), (tensors_late, objects_late) = seen[MEASURE_AT[0]], seen[MEASURE_AT[1]]
    steps = MEASURE_AT[1] - MEASURE_AT[0]
    # Tensors: the same storages (shuffle buffer, SAE, optimiser state, batch), give or take the
    # rows in flight (the harvested chunk's kept tokens and the buffer's pending rows vary by a
    # few dozen rows); one batch kept per step would add 32 batches.
    assert abs(tensors_late - tensors_early) < 4 * BATCH * ROW_BYTES, (tensors_early, tensors_late)
    # Python objects: any per-step record (a metrics history, a list of windows or batches) adds
    # at least one container per step.
    assert objects_late - objects_early < steps // 2, (objects_early, objects_late)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_lm):
    folder = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    return folder


def test_live_model_run_does_not_grow_with_its_length(tmp_path, monkeypatch, tiny_model_dir):
    assert_flat(train(["--model", str(tiny_model_dir), "--context-len", "32"], tmp_path, monkeypatch))


def test_cache_run_does_not_grow_with_its_length(tmp_path, monkeypatch, tiny_lm):
    cache = write_cache(tiny_lm, SITE, tmp_path / "cache", n_tokens=1000, context_len=32, shard_tokens=300,
                        progress=False)
    # The cache holds 1000 tokens: the run reads it for several epochs, each with a new shuffle buffer.
    assert_flat(train(["--activations", str(cache)], tmp_path, monkeypatch))
