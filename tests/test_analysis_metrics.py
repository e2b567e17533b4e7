"""Reconstruction / latent statistics against plain numpy references, reports, plots, data files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import analysis
from analysis import datasets


def _numpy_reference(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    err = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()  # variance summed over dimensions, over all tokens
    dot = (x * x_hat).sum(-1)
    nx, nh = np.linalg.norm(x, axis=-1), np.linalg.norm(x_hat, axis=-1)
    return {
        "fvu": err / total,
        "explained_variance": 1 - err / total,
        "mse": err / x.size,
        "cosine": float(np.mean(dot / (nx * nh))),
        "l2_ratio": float(np.mean(nh / nx)),
        "relative_reconstruction_bias": float((nh**2).mean() / dot.mean()),
    }


def test_reconstruction_metrics_match_numpy_and_use_summed_variance():
    g = torch.Generator().manual_seed(0)
    # Very different scales per dimension: per-dimension averaged FVU differs a lot from the summed one.
    scales = torch.tensor([100.0, 10.0, 1.0, 0.1])
    x = torch.randn(500, 4, generator=g) * scales + 3.0
    x_hat = x + torch.randn(500, 4, generator=g) * torch.tensor([1.0, 1.0, 0.5, 0.5])
    z = torch.relu(torch.randn(500, 6, generator=g))
    got = analysis.reconstruction_metrics(x, x_hat, z)
    ref = _numpy_reference(x.double().numpy(), x_hat.double().numpy())
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    xd, hd = x.double().numpy(), x_hat.double().numpy()
    per_dim_fvu = np.mean(((xd - hd) ** 2).sum(0) / ((xd - xd.mean(0)) ** 2).sum(0))
    assert abs(per_dim_fvu - got["fvu"]) > 0.1  # the wrong formula would fail this test
    assert got["l0"] == pytest.approx(float((z != 0).sum(1).double().mean()))


def test_fvu_agrees_with_the_training_loss_formula():
    import sae

    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 5
    x_hat = x + torch.randn(400, 6, generator=g, dtype=torch.float64)
    got = analysis.reconstruction_metrics(x, x_hat, torch.ones(400, 3))["fvu"]
    assert got == pytest.approx(float(sae.fvu(x, x_hat)), rel=1e-9)


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(300, 5, generator=g) + 2, torch.randn(300, 5, generator=g)
    z = torch.relu(torch.randn(300, 7, generator=g))
    stats = analysis.ReconstructionStats(5, 7)
    for sl in (slice(0, 17), slice(17, 200), slice(200, 300)):
        stats.update(x[sl], x_hat[sl], z[sl])
    one = analysis.reconstruction_metrics(x, x_hat, z)
    assert stats.result() == pytest.approx(one, rel=1e-9)
    assert torch.equal(stats.density(), (z != 0).double().mean(0))


def test_perfect_reconstruction_and_bad_input():
    x = torch.randn(50, 3)
    got = analysis.reconstruction_metrics(x, x.clone(), torch.ones(50, 2))
    assert got["fvu"] == pytest.approx(0.0, abs=1e-12) and got["explained_variance"] == pytest.approx(1.0)
    assert got["cosine"] == pytest.approx(1.0) and got["relative_reconstruction_bias"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="flatten"):
        analysis.reconstruction_metrics(x[None], x[None], torch.ones(1, 50, 2))
    with pytest.raises(ValueError, match="No tokens"):
        analysis.ReconstructionStats(3, 2).result()


def test_density_stats_and_decoder_cosine():
    density = torch.tensor([0.0, 0.0, 0.05, 0.2, 0.5])
    stats = analysis.density_stats(density, dense_threshold=0.1)
    assert stats["dead_fraction"] == pytest.approx(0.4) and stats["dense_fraction"] == pytest.approx(0.4)
    w = torch.randn(70, 9)
    w[5] = 3 * w[2]  # a duplicate direction: both get cosine 1
    got = analysis.max_decoder_cosine(w, chunk=16)
    wn = torch.nn.functional.normalize(w, dim=-1)
    sims = wn @ wn.T
    sims.fill_diagonal_(-2)
    assert torch.allclose(got, sims.max(1).values, atol=1e-6)
    assert got[2] == pytest.approx(1.0, abs=1e-6) and got[5] == pytest.approx(1.0, abs=1e-6)


def test_compare_table_and_report_roundtrip(tmp_path):
    a = {"l0": 32.0, "fvu": 0.12345, "probing": {"sae_top1_accuracy": 0.9}}
    b = {"l0": 16.0, "fvu": float("nan"), "ce_loss_score": 0.95}
    table = analysis.compare_table({"a": a, "b": b})
    lines = table.splitlines()
    assert lines[0] == "| name | l0 | fvu | ce_loss_score | probing.sae_top1_accuracy |"
    assert lines[2] == "| a | 32 | 0.1235 | - | 0.9 |" and lines[3] == "| b | 16 | nan | 0.95 | - |"
    with pytest.raises(ValueError):
        analysis.compare_table({})
    path = tmp_path / "sub" / "report.json"
    analysis.save_report(a, path)
    assert json.loads(path.read_text()) == a
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["report.json"]  # no temp file left
    analysis.save_report(b, path)  # NaN is not valid JSON: it is written as null
    assert json.loads(path.read_text()) == {"l0": 16.0, "fvu": None, "ce_loss_score": 0.95}


def test_write_plots(tmp_path):
    report = {"latent_density": [0.0, 1e-4, 0.01, 0.3], "max_decoder_cosine": [0.1, 0.2, 0.9, 0.3]}
    paths = analysis.write_plots(report, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["decoder_cosine.png", "latent_density.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_shipped_datasets_match_their_generator():
    probing = datasets.build_probing_datasets()
    assert {n: d for n, d in probing["datasets"].items()} == analysis.load_probing_datasets()
    assert datasets.build_contrastive_pairs()["pairs"] == analysis.load_contrastive_pairs()
    for data in probing["datasets"].values():
        labels = [ex["label"] for ex in data["examples"]]
        texts = [ex["text"] for ex in data["examples"]]
        assert labels.count(0) == labels.count(1) > 0 and len(set(texts)) == len(texts)
    with pytest.raises(ValueError, match="available"):
        analysis.load_probing_datasets(["nope"])
