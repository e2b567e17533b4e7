"""The TopK training step's shortcuts give the gradients of the plain formulas."""
import pytest
import torch

import sae
from sae.trainer import clip_grad_norm


@pytest.mark.parametrize("n_latents,with_dead", [(40, False), (1024, True)])
def test_topk_encoder_bias_route_gives_plain_gradients(n_latents, with_dead):
    """With x needing no gradient, b_dec's encoder gradient rides on the bias; the gradients
    equal those of the plain centred input (what an x that needs a gradient gets), at a width
    where the block top-k runs too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 24, generator=g, dtype=torch.float64) * 3 + 1
    dead = torch.zeros(n_latents, dtype=torch.bool)
    if with_dead:
        dead[::7] = True
    grads = []
    for needs_grad in (False, True):
        torch.manual_seed(0)
        model = sae.create(sae.SAEConfig(architecture="topk", d_in=24, n_latents=n_latents, k=4)).double()
        with torch.no_grad():
            model.b_dec.copy_(x.mean(0))
            model.input_scale.fill_(0.7)
        out = model.loss(x.clone().requires_grad_(needs_grad), dead_mask=dead)
        out.loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)
    assert grads[0]["b_dec"].abs().sum() > 0


def test_encoder_input_values_are_unchanged():
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=8, n_latents=64, k=4))
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_()
    x = torch.randn(5, 8)
    x_in, b_enc = model.encoder_input(x)
    assert torch.equal(x_in, model.centered(x)) and torch.equal(b_enc, model.b_enc)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    params = [torch.nn.Parameter(torch.randn(30, 7)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    want = [p.grad.clone() for p in params]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, w in zip(copies, want):
        c.grad = w
    torch.nn.utils.clip_grad_norm_(copies, max_norm)
    clip_grad_norm(params, max_norm)
    for p, c in zip(params, copies):
        assert torch.equal(p.grad, c.grad)


def test_gemm_bound_benchmark_runs_small(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_bound.py"
    spec = importlib.util.spec_from_file_location("gemm_bound", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--profile-steps", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    fused, autograd = result["fused"], result["autograd"]
    for path in (fused, autograd):
        assert path["fraction_of_gemm_bound"] > 0 and 0 < path["fvu_heldout"] < 2
        assert path["phases_ms"].get("other", 0) < 0.5 * path["profiled_step_ms"]
    assert {"encode GEMM", "top-k selection", "decode, loss and all gradients (native)",
            "optimiser and decoder renormalisation (native)"} <= set(fused["phases_ms"])
    assert {"encode GEMM", "top-k selection", "optimiser (Adam, zero_grad)"} <= set(autograd["phases_ms"])
    # the same SAE trained on the same data by either path ends at nearly the same FVU
    assert abs(fused["fvu_heldout"] - autograd["fvu_heldout"]) < 0.02
