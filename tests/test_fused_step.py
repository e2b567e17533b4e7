"""The fused CPU training step (``sae.fused_step``) computes what autograd computes: loss, its
parts, statistics and every gradient of a TopK SAE, Adam with the decoder renormalisation, and
whole training runs; and it hands anything else back to autograd untouched."""
import copy

import pytest
import torch

import activations
import sae
from kernels import native
from sae import fused_step
from sae.synthetic import SyntheticData

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the native kernels cannot be built")

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def topk_model(d: int = 24, n: int = 1000, k: int = 6, scale: float = 0.7, seed: int = 0, **cfg) -> sae.TopKSAE:
    torch.manual_seed(seed)
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=d, n_latents=n, k=k, **cfg))
    with torch.no_grad():
        model.input_scale.fill_(scale)
        model.b_dec.normal_(0, 0.5)
        model.b_enc.normal_(0, 0.1)
    return model


def batch(n_rows: int = 200, d: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d, generator=g) * 2 + 1
    x[3] *= 40  # an outlier token, like the first token after BOS
    return x


def dead_latents(n: int, every: int = 3) -> torch.Tensor:
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::every] = True
    return dead


def autograd_step(model, x, dead):
    """The trainer's autograd path: loss, backward, the decoder gradients' parallel part removed."""
    model.zero_grad(set_to_none=True)
    out = model.loss(x, dead_mask=dead)
    out.loss.backward()
    if model.unit_norm_decoder:
        model.remove_parallel_grads()
    return out, {name: getattr(model, name).grad.clone() for name in PARAMS}


def fused(model, x, dead):
    result = fused_step.loss_and_grads(model, x, dead)
    assert result is not None, "the fused step declined"
    out, norm = result
    return out, norm, {name: getattr(model, name).grad.clone() for name in PARAMS}


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-5):
    for name in PARAMS:
        scale = float(want[name].abs().max())
        assert scale > 0, f"{name}: no gradient to compare"
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def assert_outputs_agree(out, want):
    assert set(out.parts) == set(want.parts)
    for key, value in want.parts.items():
        assert float(out.parts[key]) == pytest.approx(float(value.detach()), rel=1e-5), key
    assert float(out.loss) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    assert float(out.l0) == pytest.approx(float(want.l0), rel=1e-6)
    assert torch.equal(out.fire_counts, want.fire_counts)
    assert torch.equal(out.fired, want.fired)


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("d,n,k,scale", [(24, 1000, 6, 0.7), (24, 1000, 6, 1.0), (17, 33, 1, 2.5), (40, 130, 130, 0.3)])
def test_fused_step_equals_autograd(d, n, k, scale, with_dead):
    model = topk_model(d, n, k, scale)
    x = batch(d=d)
    dead = dead_latents(n) if with_dead else None
    want_out, want = autograd_step(copy.deepcopy(model), x, dead)
    out, norm, got = fused(model, x, dead)
    assert_grads_close(got, want)
    assert_outputs_agree(out, want_out)
    assert ("auxk" in out.parts) == with_dead
    assert norm == pytest.approx(sum(float(g.double().pow(2).sum()) for g in got.values()) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("d", [32, 48])
def test_fused_step_four_entries_at_a_time_on_one_and_two_threads(d):
    """d % 16 == 0 (the gradient passes take four entries at a time, dot_axpy4 / axpy4, plus a
    remainder), ~25 entries per latent, AuxK on: autograd's gradients on 1 and 2 threads, and the
    per-latent gradients bit for bit the same on both (each sums its entries in a fixed order)."""
    model = topk_model(d, n=64, k=8)
    x, dead = batch(d=d), dead_latents(64)
    want_out, want = autograd_step(copy.deepcopy(model), x, dead)
    runs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, _, got = fused(model, x, dead)
        finally:
            torch.set_num_threads(before)
        assert_grads_close(got, want)
        assert_outputs_agree(out, want_out)
        runs.append(got)
    for name in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_fused_step_with_few_dead_latents_and_no_dead_mask_entries():
    """Fewer dead latents than k_aux (AuxK takes all of them), and an all-False mask (no AuxK)."""
    model = topk_model()
    x = batch()
    dead = torch.zeros(1000, dtype=torch.bool)
    dead[[5, 600, 999]] = True
    for mask in (dead, torch.zeros(1000, dtype=torch.bool)):
        want_out, want = autograd_step(copy.deepcopy(model), x, mask)
        out, _, got = fused(model, x, mask)
        assert_grads_close(got, want)
        assert_outputs_agree(out, want_out)


def test_fused_step_with_an_unprojected_decoder():
    """A decoder not kept at unit norm: its gradient keeps the parallel part."""
    model = topk_model()
    model.unit_norm_decoder = False
    x, dead = batch(), dead_latents(1000)
    want_out, want = autograd_step(copy.deepcopy(model), x, dead)
    out, _, got = fused(model, x, dead)
    assert_grads_close(got, want)
    parallel = (got["W_dec"] * model.W_dec.detach()).sum(1)
    assert parallel.abs().max() > 1e-3 * got["W_dec"].abs().max(), "the parallel part was removed"


def test_fused_fp32_is_as_close_to_float64_as_autograd_fp32():
    model = topk_model()
    x, dead = batch(), dead_latents(1000)
    _, exact = autograd_step(copy.deepcopy(model).double(), x.double(), dead)
    _, plain = autograd_step(copy.deepcopy(model), x, dead)
    _, _, got = fused(model, x, dead)
    for name in PARAMS:
        scale = float(exact[name].abs().max())
        fused_error = float((got[name].double() - exact[name]).abs().max()) / scale
        autograd_error = float((plain[name].double() - exact[name]).abs().max()) / scale
        assert fused_error <= max(3 * autograd_error, 1e-6), (name, fused_error, autograd_error)


def test_fused_step_writes_into_existing_grad_buffers():
    model = topk_model()
    x = batch()
    fused(model, x, None)
    buffers = [getattr(model, name).grad.data_ptr() for name in PARAMS]
    _, _, got = fused(model, x + 0.5, None)
    assert [getattr(model, name).grad.data_ptr() for name in PARAMS] == buffers
    _, want = autograd_step(copy.deepcopy(model), x + 0.5, None)
    assert_grads_close(got, want)


def test_fused_step_takes_a_strided_batch():
    model = topk_model()
    wide = batch(d=30)
    x = wide[:, 3:27]  # not contiguous
    want_out, want = autograd_step(copy.deepcopy(model), x, dead_latents(1000))
    out, _, got = fused(model, x, dead_latents(1000))
    assert_grads_close(got, want)
    assert_outputs_agree(out, want_out)


@pytest.mark.parametrize("with_dead", [False, True])
def test_fused_step_in_row_chunks_equals_autograd(monkeypatch, with_dead):
    """Batches whose pre-activations exceed the buffer limit are encoded in row chunks (the last
    one partial)."""
    monkeypatch.setattr(fused_step, "PREACT_LIMIT", 7 * 1000)
    model = topk_model()
    x, dead = batch(), dead_latents(1000) if with_dead else None
    want_out, want = autograd_step(copy.deepcopy(model), x, dead)
    out, _, got = fused(model, x, dead)
    assert_grads_close(got, want)
    assert_outputs_agree(out, want_out)


def sentinel_grads(model) -> dict:
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def transcoder() -> sae.BaseSAE:
    torch.manual_seed(0)
    return sae.create(sae.SAEConfig(architecture="transcoder", d_in=24, n_latents=100, k=4))


@pytest.mark.parametrize("case", ["float64", "nan", "inf", "jumprelu", "batchtopk", "transcoder", "wrong width",
                                  "subclass", "patched loss", "reference backend", "no grad"])
def test_fused_step_declines_and_changes_nothing(case, monkeypatch):
    x = batch()
    if case in ("jumprelu", "batchtopk"):
        torch.manual_seed(0)
        model = sae.create(sae.SAEConfig(architecture=case, d_in=24, n_latents=100, k=4))
    elif case == "transcoder":
        model = transcoder()
    elif case == "subclass":
        model = type("MyTopK", (sae.TopKSAE,), {})(topk_model().cfg)
    elif case == "reference backend":
        model = topk_model(kernel_backend="reference")
    else:
        model = topk_model()
    if case == "float64":
        model = model.double()
    elif case == "nan":
        x[7, 3] = float("nan")
    elif case == "inf":
        x[0, 0] = float("inf")
    elif case == "wrong width":
        x = batch(d=23)
    elif case == "patched loss":
        monkeypatch.setattr(sae.TopKSAE, "loss", lambda self, x, dead_mask=None: None)
    elif case == "no grad":
        model.W_dec.requires_grad_(False)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    grads = sentinel_grads(model)
    assert fused_step.loss_and_grads(model, x, dead_latents(model.cfg.n_latents)) is None
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_fused_step_declines_on_a_nan_in_the_weights():
    """A NaN in the pre-activations (not in x) is found by the selection: the step declines."""
    model = topk_model()
    with torch.no_grad():
        model.W_enc[17, 2] = float("nan")
    grads = sentinel_grads(model)
    assert fused_step.loss_and_grads(model, batch(), None) is None
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())


# -- Adam --------------------------------------------------------------------------------------

def test_adam_step_equals_torch_adam_then_after_step():
    model = topk_model(n=300)
    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99), fused=True)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=3e-3, betas=(0.9, 0.99), fused=True)
    g = torch.Generator().manual_seed(9)
    for step in range(6):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        if step == 3:  # the lr schedule writes into the group between steps
            for group in (*opt.param_groups, *ref_opt.param_groups):
                group["lr"] = 1e-3
        assert fused_step.adam_step(opt, model)
        ref_opt.step()
        reference.after_step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            for key in ("exp_avg", "exp_avg_sq"):
                want = ref_opt.state[q][key]
                torch.testing.assert_close(opt.state[p][key], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == step + 1
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(300))
    # the optimizer's state stays torch's: torch's own Adam continues from it
    opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
], ids=["sgd", "weight_decay", "amsgrad", "maximize", "adamw"])
def test_adam_step_declines_other_optimisers(make):
    model = topk_model(n=50)
    opt = make(model.parameters())
    sentinel_grads(model)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    assert not fused_step.adam_step(opt, model)
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    assert not opt.state


def test_adam_step_declines_without_gradients():
    model = topk_model(n=50)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert not fused_step.adam_step(opt, model)
    assert not opt.state


# -- the trainer -------------------------------------------------------------------------------

class Counted:
    """Wraps a function, counting the calls that did not decline."""

    def __init__(self, fn):
        self.fn, self.taken, self.calls, self.with_auxk = fn, 0, 0, 0

    def __call__(self, *args):
        result = self.fn(*args)
        self.calls += 1
        self.taken += result is not None and result is not False
        self.with_auxk += isinstance(result, tuple) and "auxk" in result[0].parts
        return result


def synthetic_run(steps: int = 20):
    data = SyntheticData(d=16, n_features=64, seed=3).sample(128 * (steps + 4))
    return data[: 128 * steps].split(128), data[128 * steps :]


def train(batches, **train_cfg) -> sae.Trainer:
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(d_in=16, n_latents=512, k=4))
    trainer = sae.Trainer(model, sae.TrainConfig(log_every=1000, warmup_steps=3, dead_tokens=256, **train_cfg))
    for x in batches:
        trainer.train_step(x)
    return trainer


def test_trainer_fused_path_trains_like_autograd(monkeypatch):
    batches, heldout = synthetic_run(20)
    counted = Counted(fused_step.loss_and_grads)
    adam = Counted(fused_step.adam_step)
    monkeypatch.setattr(fused_step, "loss_and_grads", counted)
    monkeypatch.setattr(fused_step, "adam_step", adam)
    fast = train(batches)
    assert counted.taken == counted.calls == 19 and adam.taken == 19  # every step but the first
    assert counted.with_auxk >= 5, "too few steps exercised AuxK"

    monkeypatch.setattr(fused_step, "applies", lambda model, x: False)
    plain = train(batches)
    assert counted.taken == 19 and counted.calls == 38 and adam.taken == 19

    with torch.no_grad():
        fvu_fast = float(fast.model.loss(heldout).parts["fvu"])
        fvu_plain = float(plain.model.loss(heldout).parts["fvu"])
    # measured: 3e-7 relative apart after 20 steps, weights 1e-7 to 6e-6
    assert fvu_fast == pytest.approx(fvu_plain, rel=1e-3)
    assert fvu_plain < 0.8  # it learnt something
    for name in PARAMS:
        a, b = getattr(fast.model, name).detach(), getattr(plain.model, name).detach()
        assert float((a - b).norm() / b.norm().clamp_min(1e-6)) < 1e-3, name


def test_trainer_fused_path_with_gradient_clipping_matches_autograd_for_one_step(monkeypatch):
    """One step on identical state: clipping uses the fused grad norm; weights agree closely."""
    batches, _ = synthetic_run(2)
    fast = train(batches, grad_clip=1e-3)
    monkeypatch.setattr(fused_step, "applies", lambda model, x: False)
    plain = train(batches, grad_clip=1e-3)
    for name in PARAMS:
        a, b = getattr(fast.model, name).detach(), getattr(plain.model, name).detach()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_trainer_reports_bad_values_after_the_first_step_as_before(bad):
    """The fused step declines on NaN/inf; the trainer then fails with the input check's message."""
    batches, _ = synthetic_run(3)
    trainer = train(batches[:2])
    x = batches[2].clone()
    x[5, 1] = bad
    state = {name: t.clone() for name, t in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"NaN or inf \(rows \[5\]"):
        trainer.train_step(x)
    assert trainer.step == 2
    assert all(torch.equal(t, state[name]) for name, t in trainer.model.state_dict().items())


def test_fused_path_checkpoint_and_resume_is_bit_identical(tmp_path, monkeypatch):
    batches, _ = synthetic_run(16)
    counted = Counted(fused_step.loss_and_grads)
    monkeypatch.setattr(fused_step, "loss_and_grads", counted)
    full = train(batches)
    half = train(batches[:9], out_dir=str(tmp_path))
    half.save_checkpoint()
    resumed = sae.Trainer.resume(tmp_path / "sae")
    assert resumed.step == 9
    for x in batches[9:]:
        resumed.train_step(x)
    assert counted.taken == 15 + 8 + 7
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert torch.equal(resumed.tokens_since_fired, full.tokens_since_fired)


# -- real data ---------------------------------------------------------------------------------

@pytest.mark.real_model
def test_fused_gradients_equal_autograd_on_the_default_model(default_lm):
    """Layer-3 residual stream of the default model (its huge-norm outlier tokens, the first after
    BOS, included), an SAE after a couple of training steps, with and without dead latents."""
    site = "blocks.3.hook_resid_post"
    stream = activations.stream(default_lm, [site], n_tokens=1024, batch_size=512, context_len=64, progress=False)
    xs = [b[site] for b in stream]
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(d_in=default_lm.d_model, n_latents=2048, k=32))
    trainer = sae.Trainer(model, sae.TrainConfig(lr=2e-3, warmup_steps=1))
    for x in xs:
        trainer.train_step(x)
    x = torch.cat(xs)
    norms = x.norm(dim=1)
    assert norms.max() > 8 * norms.median(), "no outlier tokens in the batch"
    for dead in (None, dead_latents(2048, every=5)):
        want_out, want = autograd_step(copy.deepcopy(model), x, dead)
        out, norm, got = fused(model, x, dead)
        assert_grads_close(got, want)
        assert_outputs_agree(out, want_out)
        assert norm == pytest.approx(sum(float(g.double().pow(2).sum()) for g in got.values()) ** 0.5, rel=1e-6)
