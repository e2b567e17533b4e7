"""Checkpoints, resume, input normalisation and error messages."""
import json

import pytest
import torch

import sae
from sae.synthetic import SyntheticData
from sae.trainer import Trainer

ARCHS = sae.architectures()
SAE_ARCHS = [a for a in ARCHS if not sae.registry.get(a).predicts_target]  # transcoders: test_transcoder.py


def small_model(arch="topk", seed=0, **kw):
    torch.manual_seed(seed)
    return sae.create(sae.SAEConfig(architecture=arch, d_in=16, n_latents=48, k=4, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_is_exact(tmp_path, arch):
    model = small_model(arch)
    trainer = sae.Trainer(model, sae.TrainConfig(lr=1e-3, warmup_steps=1, log_every=10**9))
    batches = SyntheticData(d=16, n_features=32).batches(20, 64)
    if model.predicts_target:  # a transcoder: (input, target) pairs, the target at another scale
        batches = [(b, 3 * b.flip(-1)) for b in batches]
    trainer.fit(batches, progress=False)
    model.eval()
    model.save(tmp_path / "ckpt")
    loaded = sae.load(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.folded_state_dict()[name]), name
    # A second round trip changes nothing at all.
    loaded.save(tmp_path / "again")
    again = sae.load(tmp_path / "again")
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_normalisation_scale_is_folded_into_saved_weights(tmp_path, arch):
    """Train on activations with a huge norm; the saved SAE must work on the raw activations."""
    data = SyntheticData(d=16, n_features=32)
    batches = [b * 300.0 for b in data.batches(60, 128)]
    model = small_model(arch)
    sae.Trainer(model, sae.TrainConfig(lr=3e-3, warmup_steps=5, log_every=10**9)).fit(batches, progress=False)
    assert model.input_scale.item() == pytest.approx(16**0.5 / batches[0].norm(dim=-1).mean().item(), rel=1e-5)
    model.eval()
    x = data.sample(256) * 300.0
    model.save(tmp_path / "ckpt")
    loaded = sae.load(tmp_path / "ckpt").eval()
    assert loaded.input_scale.item() == 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_resume_equals_uninterrupted(tmp_path, arch):
    batches = SyntheticData(d=16, n_features=32).batches(40, 64)
    cfg = sae.TrainConfig(lr=1e-3, warmup_steps=5, steps=40, dead_tokens=256, log_every=10**9, out_dir=str(tmp_path / "a"))

    full = small_model(arch)
    Trainer(full, cfg).fit(batches, progress=False)

    part = small_model(arch)
    first = Trainer(part, sae.TrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "b")}))
    first.fit(batches[:17], progress=False)  # stops early, as an interrupted run would
    resumed = Trainer.resume(tmp_path / "b" / "sae")
    assert resumed.step == 17
    resumed.fit(batches, progress=False)  # skips the 17 batches already seen
    for name, tensor in full.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    data = SyntheticData(d=16, n_features=32)

    def batches():
        for i in range(100):
            if i == 7:
                raise KeyboardInterrupt
            yield data.sample(32)

    trainer = Trainer(small_model(), sae.TrainConfig(out_dir=str(tmp_path), log_every=10**9))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(batches(), progress=False)
    state = json.loads((tmp_path / "sae" / "trainer_state.json").read_text())
    assert state["step"] == 7
    assert sae.load(tmp_path / "sae" / "sae").cfg.d_in == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_bad_inputs_raise_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="d_in=16"):
        model.check_input(torch.randn(4, 17))
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Trainer(model, sae.TrainConfig()).train_step(x)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        Trainer(model, sae.TrainConfig()).train_step(x)
    with pytest.raises(ValueError, match="k=10 is larger than n_latents=8"):
        sae.SAEConfig(d_in=4, n_latents=8, k=10)
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'.*topk"):
        sae.SAEConfig(d_in=4, n_latents=8, architecture="gated")
    with pytest.raises(ValueError, match="unknown SAEConfig field"):
        sae.SAEConfig.from_dict({"d_in": 4, "n_latents": 8, "bogus": 1})


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    model = small_model()
    model.save(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match="no SAE checkpoint"):
        sae.load(tmp_path / "missing")

    # Truncated weights.
    model.save(tmp_path / "trunc")
    weights = tmp_path / "trunc" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        sae.load(tmp_path / "trunc")

    # Config that does not match the weights.
    model.save(tmp_path / "mismatch")
    cfg_path = tmp_path / "mismatch" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_latents"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        sae.load(tmp_path / "mismatch")

    # Broken JSON.
    model.save(tmp_path / "badjson")
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sae.load(tmp_path / "badjson")


def test_decoder_gradient_parallel_part_is_removed():
    model = small_model()
    model.W_dec.grad = torch.randn_like(model.W_dec)
    model.remove_parallel_grads()
    dots = (model.W_dec.grad * model.W_dec).sum(dim=-1)
    assert dots.abs().max() < 1e-5


def test_lr_schedule_warms_up_and_decays():
    trainer = Trainer(small_model(), sae.TrainConfig(lr=1.0, warmup_steps=10, steps=100, decay_fraction=0.2))
    assert trainer.lr_at(0) == pytest.approx(0.1)
    assert trainer.lr_at(50) == 1.0
    assert trainer.lr_at(90) == pytest.approx(0.5)
    assert trainer.lr_at(99) == pytest.approx(0.05)


def test_loaded_sae_is_for_inference_and_still_trains(tmp_path):
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=16, n_latents=32, k=4))
    model.save(tmp_path / "m")
    loaded = sae.load(tmp_path / "m")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert not loaded(torch.randn(8, 16)).requires_grad
    before = loaded.W_enc.detach().clone()
    sae.Trainer(loaded, sae.TrainConfig(lr=1e-3, warmup_steps=1)).fit([torch.randn(64, 16) for _ in range(3)], progress=False)
    assert all(p.requires_grad for p in loaded.parameters()) and not torch.equal(before, loaded.W_enc)
