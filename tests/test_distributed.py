"""`sae train` under torchrun with 2 CPU processes (gloo): data-parallel ranks stay bit-identical
and match a one-process run with the same global batch; --distribute-sites trains each site's
SAE exactly as one process does.

Tolerance: data parallel changes only the summation order of the batch statistics (FVU's mean
and variance: two partial sums instead of one) and of the gradients (two halves added), ~1e-7
relative per step in float32; 16 Adam steps keep that below 1e-5 (measured ~2e-7), so the
weights must agree to rtol 1e-5 (atol 1e-6 for entries near 0). Distributed sites run the same
arithmetic on the same batches as one process, so those must be identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae
from sae.app.cli import main
from sae.distributed import Distributed
from sae.synthetic import SyntheticData

WORKER = Path(__file__).with_name("torchrun_worker.py")
ROOT = WORKER.parents[1]
SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def acts_file(tmp_path_factory) -> Path:
    """Two sites of synthetic activations (different dictionaries), 2048 tokens."""
    path = tmp_path_factory.mktemp("ddp") / "acts.safetensors"
    tensors = {site: SyntheticData(d=16, n_features=48, seed=i).sample(2048) for i, site in enumerate(SITES)}
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def reference(acts_file, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Both sites' TopK SAEs as one process trains them."""
    return single_process(train_args(acts_file), tmp_path_factory.mktemp("one") / "run")


def train_args(acts_file: Path, *extra: str) -> list[str]:
    # dead_tokens 256: latents go dead within the run, so AuxK and the firing counts are exercised.
    return [
        "train", "--activations", str(acts_file), "--batch-size", "128", "--n-tokens", "2048", "--n-latents", "64",
        "--k", "4", "--no-wandb", "--device", "cpu", "--log-every", "4", "--warmup-steps", "2", "--dead-tokens", "256",
        *extra,
    ]


def torchrun(args: list[str], dump: Path, **env: str) -> subprocess.CompletedProcess:
    # One thread per rank, as the two ranks share this machine's cores; the worker imports this checkout.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DUMP_DIR": str(dump), **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def dumped(dump: Path, rank: int, site: str) -> dict[str, torch.Tensor]:
    return load_file(str(dump / f"rank{rank}" / f"{site}.safetensors"))


def single_process(args: list[str], out_dir: Path, sites: list[str] = SITES) -> dict[str, dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: more threads only spin on a busy machine
    try:
        assert main(args + ["--out-dir", str(out_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    return {site: sae.load(out_dir / site).state_dict() for site in sites}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def folded(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """An in-memory SAE's state as `sae.load` returns it (input scale folded into the weights)."""
    model = sae.create(sae.SAEConfig(d_in=16, n_latents=64, k=4, architecture=architecture))
    model.load_state_dict(state)
    return model.folded_state_dict()


def test_data_parallel_interrupted_and_resumed_matches_one_process(acts_file, reference, tmp_path):
    run_dir, dump = tmp_path / "two", tmp_path / "dump"
    cut = torchrun(train_args(acts_file, "--out-dir", str(run_dir)), dump, STOP_AT_STEP="8")
    assert cut.returncode != 0 and "interrupted: checkpoints saved" in cut.stdout + cut.stderr
    for site in SITES:  # rank 0 saved every site at step 8; rank 1 saved nothing of its own
        assert json.loads((run_dir / site / "trainer_state.json").read_text())["step"] == 8
    assert not (run_dir / "metrics.rank1.jsonl").exists()

    resumed = torchrun(["train", "--resume", str(run_dir), "--no-wandb"], dump)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for site in SITES:
        rank0, rank1 = dumped(dump, 0, site), dumped(dump, 1, site)
        for name, tensor in rank0.items():
            assert torch.equal(tensor, rank1[name]), f"ranks out of sync in {site} {name}"
        assert_close(folded(rank0, "topk"), reference[site])
        assert_close(sae.load(run_dir / site).state_dict(), reference[site])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 16 and steps[-1][f"{SITES[0]}/tokens"] == 2048  # global tokens, logged once


def test_data_parallel_jumprelu_matches_one_process(acts_file, tmp_path):
    """JumpReLU's L0 penalty and its first-batch thresholds read the whole batch."""
    args = train_args(acts_file, "--architecture", "jumprelu", "--sites", SITES[0])
    reference = single_process(args, tmp_path / "one", sites=SITES[:1])
    dump = tmp_path / "dump"
    two = torchrun(args + ["--out-dir", str(tmp_path / "two")], dump)
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = dumped(dump, 0, SITES[0]), dumped(dump, 1, SITES[0])
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert_close(folded(rank0, "jumprelu"), reference[SITES[0]])


def test_distributed_sites_train_each_site_as_one_process_does(acts_file, reference, tmp_path):
    run_dir, dump = tmp_path / "two", tmp_path / "dump"
    two = torchrun(train_args(acts_file, "--out-dir", str(run_dir), "--distribute-sites"), dump)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (dump / "rank0" / f"{SITES[0]}.safetensors").is_file() and not (dump / "rank0" / f"{SITES[1]}.safetensors").exists()
    assert (dump / "rank1" / f"{SITES[1]}.safetensors").is_file() and not (dump / "rank1" / f"{SITES[0]}.safetensors").exists()
    for site in SITES:
        saved = sae.load(run_dir / site).state_dict()
        for name, tensor in reference[site].items():
            assert torch.equal(saved[name], tensor), f"{site} {name}"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.rank1.jsonl").is_file()


def test_batch_topk_refuses_data_parallel_and_batches_must_split_evenly():
    ranks = Distributed(rank=0, world_size=2, local_rank=0, device="cpu")  # no collective is reached
    model = sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=2, architecture="batchtopk"))
    with pytest.raises(ValueError, match="cannot train data-parallel.*--distribute-sites"):
        sae.Trainer(model, data_parallel=ranks)
    with pytest.raises(ValueError, match="batch size 7 does not split evenly over 2 processes"):
        ranks.shard(7)
    assert ranks.shard(8) == slice(0, 4) and Distributed(1, 2, 1, "cpu").shard(8) == slice(4, 8)
