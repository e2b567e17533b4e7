"""A TopK SAE's training loss and gradients on CPU in a few native passes, without autograd.

It computes exactly what ``TopKSAE.loss(x, dead_mask).loss.backward()`` followed by
``remove_parallel_grads()`` computes (tests compare the two), but shaped for the CPU:

1. ``xc = x * input_scale - b_dec`` and the FVU's denominator in one pass over x
   (``kernels.native.prepare``); the encoder GEMM ``xc @ W_enc^T`` into a reused buffer (one
   call for the whole batch where it fits: row chunks cost the GEMM 3-13%);
2. per row, the top k of ``pre + b_enc`` (and the AuxK top among the dead latents) in one pass
   over the pre-activations (``topk_rows``, ``topk_cols``), unranked: step 3 sorts entries by
   latent anyway;
3. decode, loss and every gradient (``topk_grads``): a latent-major decode, the residual per
   token, then per latent the decoder gradient rows (the part along each decoder row removed)
   and the encoder gradient rows, written into the existing ``.grad`` tensors (no zeroing, no
   fresh allocations), with the firing counts and squared norms.

The gradient norm comes out of step 3, so clipping needs no extra pass; ``adam_step`` then
updates on the optimizer's own state. Used by the trainer for plain TopK SAEs on CPU in one
process; anything else (other architectures, CUDA, float64, data parallel, no C++ compiler)
takes the autograd path. A NaN in the pre-activations also hands the step back to autograd,
which then fails or propagates it exactly as before.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.profiler import record_function

from kernels import native, select
from sae.base import SAEOutput
from sae.topk import TopKSAE

# The whole batch's pre-activations at once up to this many elements (256 MiB of fp32).
PREACT_LIMIT = 1 << 26


# What the fused step stands in for; a class whose methods differ (a subclass, a patched method)
# takes the autograd path.
_LOSS, _REMOVE_PARALLEL, _AFTER_STEP = TopKSAE.loss, TopKSAE.remove_parallel_grads, TopKSAE.after_step


def applies(model, x: Tensor) -> bool:
    if type(model) is not TopKSAE or type(model).loss is not _LOSS or type(model).remove_parallel_grads is not _REMOVE_PARALLEL:
        return False
    params = (model.W_enc, model.b_enc, model.W_dec, model.b_dec)
    return (
        model.cfg.kernel_backend == "auto"
        and x.dim() == 2
        and x.shape[1] == model.cfg.d_in
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
    with record_function("fused: encoder input"):
        xc, total = native.prepare(x, scale, b_dec)
    if not math.isfinite(total):  # NaN or inf in x: the autograd path's input check reports it
        return None
    total = max(total, torch.finfo(x.dtype).tiny)

    dead = dead_mask.nonzero().flatten() if dead_mask is not None and dead_mask.any() else None
    k_aux = 0 if dead is None else min(cfg.effective_k_aux, dead.numel())
    vals, idx = torch.empty(n_rows, cfg.k), torch.empty(n_rows, cfg.k, dtype=torch.long)
    aux_vals, aux_idx = torch.empty(n_rows, k_aux), torch.empty(n_rows, k_aux, dtype=torch.long)
    step = max(1, min(n_rows, PREACT_LIMIT // n))
    buffer = select.chunk_buffer(step, n, torch.float32, x.device)
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        with record_function("fused: encode GEMM"):
            pre = torch.mm(xc[s:e], W_enc.t(), out=buffer[: e - s])
        with record_function("fused: top-k"):
            if native.topk_rows(pre, b_enc, cfg.k, relu=True, out=(vals[s:e], idx[s:e]), ranked=False) is None:
                return None
            if k_aux:
                picked = native.topk_cols(pre, b_enc, dead, k_aux, relu=True, ranked=False)
                if picked is None:
                    return None
                aux_vals[s:e], aux_idx[s:e] = picked

    grads = tuple(_grad(p) for p in (model.W_dec, model.W_enc, model.b_enc, model.b_dec))
    with record_function("fused: loss and gradients"):
        res = native.topk_grads(x, xc, (vals, idx), (aux_vals, aux_idx) if k_aux else None, W_enc, W_dec, b_dec,
                                1 / scale, total, cfg.aux_coeff, model.unit_norm_decoder, out=grads)
    parts = {"fvu": torch.tensor(res["sse"] / total)}
    loss = parts["fvu"]
    if k_aux:
        parts["auxk"] = torch.tensor(res["aux_sse"] / max(res["aux_total"], torch.finfo(torch.float32).tiny))
        loss = loss + cfg.aux_coeff * parts["auxk"]
    db_dec = grads[3]
    fire_counts, sumsq = res["fired"], res["sumsq"]
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


@torch.no_grad()
def adam_step(optimizer: torch.optim.Optimizer, model: TopKSAE) -> bool:
    """``optimizer.step()`` then ``model.after_step()`` (the decoder's rows back to unit norm) in
    one native pass per parameter, on the optimizer's own state (so checkpoints and the autograd
    path see the same Adam). False (nothing done) where they must run as they are: an optimizer
    other than plain Adam, or parameters the native kernels do not take."""
    if (type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1 or not native.available()
            or type(model).after_step is not _AFTER_STEP):
        return False
    group = optimizer.param_groups[0]
    if group["weight_decay"] or group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable"):
        return False
    params = group["params"]
    if any(p.grad is None or p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous()
           or not p.grad.is_contiguous() for p in params):
        return False
    with record_function("fused: Adam and decoder renormalisation"):
        for p in params:
            _adam_update(optimizer.state[p], p, group, renorm=p is model.W_dec and model.unit_norm_decoder)
    return True


def _adam_update(state: dict, p: torch.nn.Parameter, group: dict, renorm: bool) -> None:
    if not state:  # what torch's Adam creates on its first step
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    native.adam(p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), float(group["lr"]),
                group["betas"], group["eps"], renorm_rows=renorm)
