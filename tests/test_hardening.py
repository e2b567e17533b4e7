"""The bad-input and fault sweep of issue 10: each case is a one-line error naming the problem and
the fix (or, for faults, a run that survives them)."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sae
import sae.trainer
from sae.app.cli import build_parser, defaults, main
from sae.app.run import default_run_name
from sae.synthetic import SyntheticData


@pytest.fixture
def acts_file(tmp_path) -> Path:
    path = tmp_path / "acts.safetensors"
    save_file({"x": SyntheticData(d=8, n_features=16).sample(512)}, str(path))
    return path


def error_line(argv: list[str]) -> str:
    """The message `sae ...` exits with; it must be one line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert "\n" not in message and len(message) < 400, message
    return message


def train_args(acts: Path, *extra: str) -> list[str]:
    return ["train", "--activations", str(acts), "--no-wandb", "--batch-size", "64", "--n-tokens", "640", *extra]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--batch-size", "-4"], "batch_size must be a positive integer, got -4"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--n-tokens", "0"], "n_tokens must be a positive integer, got 0"),
        (["--n-tokens", "-5"], "n_tokens must be a positive integer, got -5"),
        (["--log-every", "0"], "TrainConfig.log_every must be a positive integer"),
        (["--adam-betas", "0.9", "1.5"], "adam_betas must be two numbers in [0, 1)"),
        (["--k", "0"], "SAEConfig.k must be a positive integer"),
        (["--device", "gpu7"], "unknown device 'gpu7'"),
        pytest.param(["--device", "cuda"], "is not available on this machine (no CUDA)",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        (["--wandb-mode", "sometimes"], "wandb_mode must be offline, online or disabled"),
    ],
)
def test_bad_flag_values(acts_file, tmp_path, flags, expected):
    out = tmp_path / "run"
    argv = [a for a in train_args(acts_file, "--out-dir", str(out), *flags) if a != "--no-wandb" or "--wandb-mode" not in flags]
    assert expected in error_line(argv)
    assert not out.exists(), "a failed run left its folder behind"


def test_tuple_flags_take_exactly_their_length(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--adam-betas", "0.9"])
    assert "--adam-betas: expected 2 arguments" in capsys.readouterr().err


def test_help_shows_what_a_bare_train_uses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    shown = defaults()
    assert shown["data"]["n_tokens"] == 100_000 and shown["run"]["expansion_factor"] == 8  # main_job.yaml
    assert f"Training tokens per SAE. (default: {shown['data']['n_tokens']})" in text
    assert f"(default: {shown['data']['batch_size']})" in text and "(default: 0.9 0.999)" in text


def test_config_file_keeps_main_job_defaults(acts_file, tmp_path):
    (tmp_path / "c.yaml").write_text(f"data:\n  activations: {acts_file}\n  n_tokens: 640\n  batch_size: 64\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--no-wandb", "--out-dir", str(tmp_path / "r")]) == 0
    saved = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert saved["train"]["lr"] == defaults()["train"]["lr"] and saved["run"]["expansion_factor"] == 8


def test_device_defaults_to_auto_everywhere():
    parser = build_parser()
    train = parser.parse_args(["train"])
    assert defaults()["data"]["device"] == "auto" and "data.device" not in vars(train)
    assert parser.parse_args(["eval", "x"]).device == "auto"
    assert parser.parse_args(["cache", "--sites", "blocks.1.hook_resid_post", "--out", "o"]).device == "auto"


def test_unknown_flag_type_fails_loudly():
    import dataclasses

    from sae.app.cli import flag_kwargs

    @dataclasses.dataclass
    class Odd:
        ratio: complex = 1j

    with pytest.raises(TypeError, match="no command-line flag for type 'complex'"):
        flag_kwargs(Odd, dataclasses.fields(Odd)[0])


def test_bad_paths_and_files(acts_file, tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert error_line(train_args(missing)) == f"error: no activations file or cache folder at {missing}"
    (tmp_path / "junk.safetensors").write_text("not tensors")
    assert "is not a readable .safetensors activation file" in error_line(train_args(tmp_path / "junk.safetensors"))
    assert error_line(["train", "--model", "/nonexistent", "--no-wandb"]).startswith("error: no model folder at /nonexistent;")
    assert "unknown hook site 'blocks.x'" in error_line(["train", "--sites", "blocks.x", "--no-wandb"])
    assert error_line(["eval", str(tmp_path / "none")]) == f"error: no SAE checkpoint directory at {tmp_path / 'none'}"
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    assert "is not valid YAML" in error_line(["train", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "list.yaml").write_text("train: 5\n")
    assert "must be mappings" in error_line(["train", "--config", str(tmp_path / "list.yaml")])


def test_unknown_site_of_a_real_model_is_one_compact_line(tiny_lm, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    line = error_line(["train", "--model", str(model_dir), "--sites", "blocks.9.hook_resid_post", "--no-wandb"])
    assert line.endswith("valid: blocks.{0..3}.{hook_resid_pre,hook_resid_post,hook_attn_out,hook_mlp_out,mlp.hook_in}")


def test_checkpoint_configs_must_state_their_defining_fields(tmp_path):
    model = sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=3))
    for field in ("d_in", "k"):
        model.save(tmp_path / field)
        config = json.loads((tmp_path / field / "config.json").read_text())
        del config[field]
        (tmp_path / field / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=rf"lacks required field\(s\) \['{field}'\]"):
            sae.load(tmp_path / field)


def test_kernel_backend_is_how_to_run_not_what_is_saved(tmp_path):
    model = sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=3, kernel_backend="triton"))
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "kernel_backend" not in config
    config["kernel_backend"] = "triton"  # as older checkpoints stored it
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = sae.load(tmp_path / "m")
    assert loaded.cfg.kernel_backend == "auto"
    x = torch.randn(5, 8)
    assert torch.allclose(loaded(x), sae.load(tmp_path / "m", kernel_backend="reference")(x), atol=1e-5)


def test_cache_manifest_is_checked(tiny_lm, tiny_windows, tmp_path):
    from activations.cache import CachedActivations, CacheError, write_cache

    site = "blocks.1.hook_resid_post"
    good = write_cache(tiny_lm, [site], tmp_path / "c", texts=tiny_windows[:4], shard_tokens=50, progress=False)

    def variant(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    renamed = variant("renamed", lambda m: m.update(sites=["blocks.2.hook_resid_post"]))
    with pytest.raises(CacheError, match="does not hold the manifest's sites"):
        CachedActivations(renamed)
    counted = variant("counted", lambda m: m.update(n_tokens=m["n_tokens"] + 7))
    with pytest.raises(CacheError, match=r"says n_tokens=\d+ but its shards hold"):
        CachedActivations(counted)
    (tmp_path / "outside.safetensors").write_bytes((good / "shard_00000.safetensors").read_bytes())
    escaping = variant("escaping", lambda m: m["shards"][0].update(file="../outside.safetensors"))
    with pytest.raises(CacheError, match="is not a plain file name inside the cache"):
        CachedActivations(escaping)
    assert "does not hold the manifest's sites" in error_line(["train", "--activations", str(renamed), "--no-wandb"])


def test_cache_overwrite_keeps_the_old_cache_until_the_new_one_is_whole(tiny_lm, tiny_windows, tmp_path):
    from activations.cache import CachedActivations, write_cache

    site = "blocks.1.hook_resid_post"
    out = write_cache(tiny_lm, [site], tmp_path / "c", texts=tiny_windows[:4], progress=False)
    before = CachedActivations(out).n_tokens
    with pytest.raises(ValueError, match="empty"):  # the new harvest fails half-way
        write_cache(tiny_lm, [site], out, texts=tiny_windows[:0], overwrite=True, progress=False)
    assert CachedActivations(out).n_tokens == before and os.listdir(tmp_path) == ["c"]
    mask = atomic_umask()
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((out / "manifest.json").stat().st_mode & 0o777) == 0o666 & ~mask


def atomic_umask() -> int:
    import atomicfs

    return atomicfs.perms.UMASK


def test_cache_command_errors_are_one_line(tmp_path):
    assert "unknown hook site 'resid'" in error_line(["cache", "--sites", "resid", "--out", str(tmp_path / "c")])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    line = error_line(["cache", "--sites", "blocks.1.hook_resid_post", "--out", str(tmp_path / "busy")])
    assert "already exists and is not empty; choose another --out or pass --overwrite" in line
    assert "--tokens must be a positive integer" in error_line(
        ["cache", "--sites", "blocks.1.hook_resid_post", "--out", str(tmp_path / "c"), "--tokens", "0"]
    )


def test_tensor_names_cannot_escape_the_run_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    acts = SyntheticData(d=8, n_features=16).sample(256)
    save_file({str(victim): acts, "../escape": acts.clone()}, str(tmp_path / "evil.safetensors"))
    run = tmp_path / "run"
    assert main(train_args(tmp_path / "evil.safetensors", "--out-dir", str(run), "--n-tokens", "128")) == 0
    assert (victim / "precious.txt").read_text() == "keep" and not (tmp_path / "escape").exists()
    folders = sorted(p.name for p in run.iterdir() if (p / "sae").is_dir())
    assert folders == ["escape", str(victim).strip("/").replace("/", "_")]
    assert sae.load(run / "escape").metadata["tensor"] == "../escape"


def test_tensor_file_runs_record_model_and_site_and_eval_says_what_is_missing(acts_file, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(acts_file, "--out-dir", str(run))) == 0
    line = error_line(["eval", str(run / "x"), "--wandb-mode", "disabled"])
    assert "does not record its hook site and model (trained from a tensor file?); pass --site" in line
    named = tmp_path / "named"
    assert main(train_args(acts_file, "--out-dir", str(named), "--model", "my-model", "--sites", "blocks.3.hook_resid_post")) == 0
    metadata = sae.load(named / "blocks.3.hook_resid_post").metadata
    assert metadata["site"] == "blocks.3.hook_resid_post" and metadata["model"] == "my-model"


def test_a_run_folder_has_one_owner(acts_file, tmp_path):
    import atomicfs

    run = tmp_path / "run"
    with atomicfs.DirLock(run, "run folder"):
        line = error_line(train_args(acts_file, "--out-dir", str(run)))
    assert line == f"error: run folder {run} is in use by another process (pid {os.getpid()}); wait for it to finish or choose another folder"
    assert main(train_args(acts_file, "--out-dir", str(run))) == 0
    line = error_line(train_args(acts_file, "--out-dir", str(run)))
    assert line == f"error: {run} already holds a run; continue it with --resume {run} or choose another --out-dir"
    assert default_run_name() != default_run_name()


def _interrupt_at(monkeypatch, step: int) -> None:
    original = sae.Trainer.train_step

    def interrupted(self, x):
        if self.step == step:
            raise KeyboardInterrupt
        original(self, x)

    monkeypatch.setattr(sae.Trainer, "train_step", interrupted)


def test_resume_writes_to_the_folder_given_and_a_failed_resume_changes_nothing(acts_file, tmp_path, monkeypatch):
    args = train_args(acts_file, "--k", "3", "--expansion-factor", "2", "--n-tokens", "1280")
    _interrupt_at(monkeypatch, 7)
    assert main(args + ["--out-dir", str(tmp_path / "a")]) == 130
    monkeypatch.undo()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    saved = (tmp_path / "b" / "run_config.json").read_bytes()
    acts_file.rename(tmp_path / "moved.safetensors")
    assert "no activations file" in error_line(["train", "--resume", str(tmp_path / "b"), "--no-wandb"])
    assert (tmp_path / "b" / "run_config.json").read_bytes() == saved
    (tmp_path / "moved.safetensors").rename(acts_file)
    assert main(["train", "--resume", str(tmp_path / "b"), "--no-wandb"]) == 0
    state = lambda run: json.loads((tmp_path / run / "x" / "trainer_state.json").read_text())
    assert state("a")["step"] == 7 and state("b")["step"] == 20
    assert state("b")["train_config"]["out_dir"] == str(tmp_path / "b")


def test_a_signal_inside_a_step_saves_after_it_and_resumes_exactly(tmp_path, monkeypatch):
    data = SyntheticData(d=8, n_features=16).sample(64 * 30).split(64)
    cfg = {"warmup_steps": 3, "log_every": 100}

    def fresh(out: str) -> sae.Trainer:
        torch.manual_seed(0)
        return sae.Trainer(sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=3)), sae.TrainConfig(out_dir=out, **cfg))

    full = fresh(str(tmp_path / "full")).fit(data, progress=False)
    trainer = fresh(str(tmp_path / "cut"))
    original = sae.trainer.clip_grad_norm

    def clip_grad_norm(*args):  # inside the step, on either path (patching a model method would
        original(*args)  # send this run down the autograd path and the uninterrupted one not)
        if trainer.step == 11:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sae.trainer, "clip_grad_norm", clip_grad_norm)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(data, progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "sae" / "trainer_state.json").read_text())["step"] == 12
    resumed = sae.Trainer.resume(tmp_path / "cut" / "sae").fit(data, progress=False)
    for name, tensor in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_sigterm_saves_like_ctrl_c_and_resumes_bit_identically(tmp_path, monkeypatch):
    acts = SyntheticData(d=16, n_features=32).sample(2048)
    save_file({"x": acts}, str(tmp_path / "acts.safetensors"))
    args = [
        "train", "--activations", str(tmp_path / "acts.safetensors"), "--n-tokens", "10240", "--batch-size", "256",
        "--k", "4", "--expansion-factor", "2", "--no-wandb", "--log-every", "7",
    ]
    assert main([*args, "--out-dir", str(tmp_path / "full")]) == 0
    original = sae.trainer.clip_grad_norm

    def clip_grad_norm(*args):  # a real SIGTERM to this process, in the middle of step 25
        original(*args)
        calls.append(1)
        if len(calls) == 25:
            os.kill(os.getpid(), signal.SIGTERM)

    calls: list[int] = []
    monkeypatch.setattr(sae.trainer, "clip_grad_norm", clip_grad_norm)
    assert main([*args, "--out-dir", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handler outlived the run"
    assert json.loads((tmp_path / "cut" / "x" / "trainer_state.json").read_text())["step"] == 25
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-wandb"]) == 0
    full, resumed = sae.load(tmp_path / "full" / "x"), sae.load(tmp_path / "cut" / "x")
    for name, tensor in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed.metadata == full.metadata and resumed.metadata["tensor"] == "x"


def test_trainer_seeds_and_fit_many_refuses_differing_schedules():
    sae.Trainer(sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=3)), sae.TrainConfig(seed=1234))
    assert torch.initial_seed() == 1234
    trainers = {
        name: sae.Trainer(sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=3)), sae.TrainConfig(log_every=every, steps=4))
        for name, every in (("a", 10), ("b", 20))
    }
    with pytest.raises(ValueError, match=r"must share their schedule, but log_every differs: \{'a': 10, 'b': 20\}"):
        sae.fit_many(trainers, [{"a": torch.randn(4, 8), "b": torch.randn(4, 8)}] * 4, progress=False)


def test_checkpoints_follow_the_umask(tmp_path):
    trainer = sae.Trainer(sae.create(sae.SAEConfig(d_in=8, n_latents=16, k=3)), sae.TrainConfig(out_dir=str(tmp_path)))
    trainer.fit([torch.randn(16, 8)] * 2, progress=False)
    mask = atomic_umask()
    for path in [tmp_path / "sae", *(tmp_path / "sae").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path
