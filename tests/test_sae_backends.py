"""The SAEs run on the fused kernels by default; kernel_backend="reference" gives the same answer."""
import pytest
import torch

import sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fused_and_reference_backends_agree(arch):
    x = torch.randn(64, 24)
    grads = {}
    for backend in ("torch", "reference"):
        torch.manual_seed(0)
        model = sae.create(sae.SAEConfig(architecture=arch, d_in=24, n_latents=40, k=5, kernel_backend=backend))
        dead = torch.zeros(40, dtype=torch.bool)
        dead[::3] = True
        out = model.loss(x, dead_mask=dead)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["torch"][0], grads["reference"][0])
    for name, grad in grads["torch"][1].items():
        torch.testing.assert_close(grad, grads["reference"][1][name], rtol=1e-4, atol=1e-6, msg=name)
