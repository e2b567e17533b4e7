"""A TopK SAE's training loss and gradients on CPU in a few native passes, without autograd.

It computes exactly what ``TopKSAE.loss(x, dead_mask).loss.backward()`` followed by
``remove_parallel_grads()`` computes (tests compare the two), but shaped for the CPU:

1. ``xc = x * input_scale - b_dec``; the encoder GEMM ``xc @ W_enc^T`` into a reused buffer
   (one call for the whole batch where it fits: row chunks cost the GEMM 3-13%);
2. per row, the ranked top k of ``pre + b_enc`` (and the AuxK top among dead latents) in one
   pass over the pre-activations (``kernels.native.topk_rows``);
3. per row, decode, residual, loss and the gradient of every selected value in one pass
   (``decode_grad``), for the main and the AuxK reconstruction;
4. per latent, the decoder and encoder gradient rows, the decoder row's parallel part removed,
   firing counts and squared norms in one pass (``latent_grads``), written into the existing
   ``.grad`` tensors (no zeroing, no fresh allocations).

The gradient norm comes out of step 4, so clipping needs no extra pass. Used by the trainer
for plain TopK SAEs on CPU in one process; anything else (other architectures, CUDA, float64,
data parallel, no C++ compiler) takes the autograd path. A NaN in the pre-activations also
hands the step back to autograd, which then fails or propagates it exactly as before.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import native, select
from sae.base import SAEOutput
from sae.topk import TopKSAE

# The whole batch's pre-activations at once up to this many elements (256 MiB of fp32).
PREACT_LIMIT = 1 << 26


def applies(model, x: Tensor) -> bool:
    params = (model.W_enc, model.b_enc, model.W_dec, model.b_dec)
    return (
        type(model) is TopKSAE
        and model.cfg.kernel_backend in ("auto", "torch")
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and all(p.dtype == torch.float32 and p.requires_grad for p in params)
        and x.shape[0] * (model.cfg.k + model.cfg.effective_k_aux) < 2**31
        and native.available()
    )


def _grad(p: torch.nn.Parameter) -> Tensor:
    """The parameter's gradient buffer, to be overwritten (allocated on first use only)."""
    if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
        p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return p.grad


@torch.no_grad()
def loss_and_grads(model: TopKSAE, x: Tensor, dead_mask: Tensor | None) -> tuple[SAEOutput, float] | None:
    """Sets every parameter's ``.grad`` and returns ``(output, gradient norm)``; None (nothing
    changed) where the step must take the autograd path instead."""
    if not applies(model, x):
        return None
    x = x.contiguous()
    cfg = model.cfg
    n_rows, n = x.shape[0], cfg.n_latents
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))
    scale = float(model.input_scale)
    xc, total = native.prepare(x, scale, b_dec)
    total = max(total, torch.finfo(x.dtype).tiny)

    dead = dead_mask.nonzero().flatten() if dead_mask is not None and dead_mask.any() else None
    k_aux = 0 if dead is None else min(cfg.effective_k_aux, dead.numel())
    vals, idx = torch.empty(n_rows, cfg.k), torch.empty(n_rows, cfg.k, dtype=torch.long)
    aux_vals, aux_idx = torch.empty(n_rows, k_aux), torch.empty(n_rows, k_aux, dtype=torch.long)
    step = max(1, min(n_rows, PREACT_LIMIT // n))
    buffer = select.chunk_buffer(step, n, torch.float32, x.device)
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        pre = torch.mm(xc[s:e], W_enc.t(), out=buffer[: e - s])
        if native.topk_rows(pre, b_enc, cfg.k, relu=True, out=(vals[s:e], idx[s:e])) is None:
            return None
        if k_aux:
            picked = native.topk_cols(pre, b_enc, dead, k_aux, relu=True)
            if picked is None:
                return None
            aux_vals[s:e], aux_idx[s:e] = picked

    sse, D, gsel, resid, db_dec = native.decode_grad(vals, idx, W_dec, b_dec, x, 1 / scale, 1 / total,
                                                     want_resid=k_aux > 0)
    parts = {"fvu": torch.tensor(sse / total)}
    loss = parts["fvu"]
    aux = None
    if k_aux:
        aux_total = (resid - resid.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        aux_sse, D_aux, gsel_aux, _, _ = native.decode_grad(
            aux_vals, aux_idx, W_dec, None, resid, 1 / scale, cfg.aux_coeff / float(aux_total), want_resid=False)
        parts["auxk"] = torch.tensor(aux_sse / float(aux_total))
        loss = loss + cfg.aux_coeff * parts["auxk"]
        aux = (aux_idx, aux_vals, gsel_aux, D_aux)

    dW_dec, dW_enc, db_enc = _grad(model.W_dec), _grad(model.W_enc), _grad(model.b_enc)
    fire_counts, sumsq = native.latent_grads(n, (idx, vals, gsel, D), aux, xc, W_dec if model.unit_norm_decoder else None,
                                             out=(dW_dec, dW_enc, db_enc))
    # b_dec also reaches the loss through the encoder's input xc = x * scale - b_dec
    db_dec.sub_(W_enc.t() @ db_enc)
    _grad(model.b_dec).copy_(db_dec)
    grad_norm = float(sumsq.sum() + db_dec.double().pow(2).sum()) ** 0.5
    out = SAEOutput(
        loss=loss,
        x_hat=None,
        parts=parts,
        fired=fire_counts.nonzero().flatten(),
        l0=fire_counts.sum() / n_rows,
        fire_counts=fire_counts,
    )
    return out, grad_norm
