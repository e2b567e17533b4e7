"""Splicing an SAE into the model, and the downstream scores that splicing gives.

CE loss score = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 when the SAE's output is as good
as the real activation, 0 when it is no better than zero-ablating the site.
KL score = (KL_zero - KL_sae) / KL_zero, with KL(clean || patched) of the next-token
distribution. Both the SAE splice and the zero ablation replace the same (kept) positions;
BOS / pad / special positions keep their real activation, as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

import activations


def sae_splice(
    model: torch.nn.Module, mask: Tensor | None = None, keep_error: bool = False
) -> Callable[[Tensor], Tensor]:
    """A function for `activations.patch_site` that swaps an activation a [B, T, d] for the SAE's x_hat.

    mask (bool [B, T]) limits the swap to those positions. keep_error=True returns
    x_hat + (a - x_hat).detach(): the forward value is the real activation, but gradients flow
    through the SAE's latents (for attribution and steering through the error term).
    """

    def fn(a: Tensor) -> Tensor:
        flat = a.reshape(-1, a.shape[-1])
        x_hat = model(flat.to(_dtype(model))).to(a.dtype).reshape(a.shape)
        new = x_hat + (a - x_hat).detach() if keep_error else x_hat
        return new if mask is None else torch.where(mask.to(a.device)[..., None], new, a)

    return fn


@contextmanager
def transcoder_splice(
    lm: activations.LanguageModel, model: torch.nn.Module, site: str, target_site: str, mask: Tensor | None = None
) -> Iterator[None]:
    """Within the block, a transcoder's prediction from `site`'s activation replaces
    `target_site`'s activation of the same forward (at `mask` positions), e.g. an MLP's output
    predicted from its input."""
    seen: dict[str, Tensor] = {}

    def capture(a: Tensor) -> None:
        seen["input"] = a

    def predict(a: Tensor) -> Tensor:
        if "input" not in seen:
            raise ValueError(f"{target_site} ran before {site}: a transcoder's input site must come before its target")
        x = seen.pop("input")
        flat = x.reshape(-1, x.shape[-1]).to(_dtype(model))
        new = model(flat).to(a.dtype).reshape(a.shape)
        return new if mask is None else torch.where(mask.to(a.device)[..., None], new, a)

    with activations.patch_site(lm, site, capture), activations.patch_site(lm, target_site, predict):
        yield


def zero_splice(mask: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """A function for `activations.patch_site` that zero-ablates the activation (at `mask` positions)."""

    def fn(a: Tensor) -> Tensor:
        return torch.zeros_like(a) if mask is None else torch.where(mask.to(a.device)[..., None], 0.0, a)

    return fn


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _next_token_logprobs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def downstream_sums(
    model: torch.nn.Module, lm: activations.LanguageModel, site: str, input_ids: Tensor, keep: Tensor,
    target_site: str | None = None,
) -> dict[str, float]:
    """Summed CE / KL over the scored positions of one batch (see `downstream_scores`).

    A position t is scored when token t and its target t+1 are both kept, so predictions made
    from BOS and predictions of pad / EOS are left out. With `target_site` the model is a
    transcoder: its prediction (and the zero ablation) replaces that site's activation.
    """
    input_ids, keep = input_ids.to(lm.device), keep.to(lm.device)
    scored = keep[:, :-1] & keep[:, 1:]
    targets = input_ids[:, 1:, None]
    clean = _next_token_logprobs(activations.logits(lm, input_ids))
    sums = {"n_positions": float(scored.sum()), "ce_clean": float(-clean.gather(-1, targets)[..., 0][scored].sum())}
    replaced = target_site or site
    splices = {
        "sae": activations.patch_site(lm, site, sae_splice(model, keep)) if target_site is None
        else transcoder_splice(lm, model, site, target_site, keep),
        "zero": activations.patch_site(lm, replaced, zero_splice(keep)),
    }
    for name, splice in splices.items():
        with splice:
            patched = _next_token_logprobs(activations.logits(lm, input_ids))
        sums[f"ce_{name}"] = float(-patched.gather(-1, targets)[..., 0][scored].sum())
        # One window at a time: the [T, vocab] temporaries stay small (a whole batch's would be
        # three more copies of the logits at once).
        kl = torch.stack([(c.exp() * (c - q)).sum(-1) for c, q in zip(clean, patched)])
        sums[f"kl_{name}"] = float(kl[scored].sum())
        del patched  # before the next forward allocates its own logits
    return sums


def downstream_scores(sums: dict[str, float]) -> dict[str, float]:
    """Mean CE / KL per scored position and the CE-loss and KL scores, from summed `downstream_sums`."""
    n = sums["n_positions"]
    if n == 0:
        raise ValueError("No positions to score (every token is BOS / pad / special); pass longer texts.")
    ce_clean, ce_sae, ce_zero = sums["ce_clean"] / n, sums["ce_sae"] / n, sums["ce_zero"] / n
    kl_sae, kl_zero = sums["kl_sae"] / n, sums["kl_zero"] / n
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "delta_ce": ce_sae - ce_clean,
        "ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
        "kl_sae": kl_sae,
        "kl_zero": kl_zero,
        "kl_score": (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan"),
    }
