"""Reading (`harvest`) and replacing (`patch_site`) activations at hook sites."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .model import LanguageModel
from .sites import INPUT_KINDS, Site, parse_sites, site_module
from .text import encode_texts


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured, to skip the rest of the model."""


def _first(value: Any) -> Tensor:
    # transformers 5 decoder layers return a tensor; attention modules (and older layers) a tuple.
    return value if isinstance(value, Tensor) else value[0]


def _replace_first(value: Any, new: Tensor) -> Any:
    return new if isinstance(value, Tensor) else (new, *value[1:])


def _attach(site: Site, module: nn.Module, fn: Callable[[Tensor], Tensor | None]) -> Any:
    """Register a hook calling `fn(activation)`; a returned tensor replaces the activation."""
    if site.kind in INPUT_KINDS:

        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)

    return module.register_forward_hook(hook)


def _check_inputs(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}; "
            "tokenise first (e.g. activations.token_windows)."
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")


@torch.no_grad()
def harvest(
    lm: LanguageModel,
    input_ids: Tensor | str | list[str],
    sites: str | list[str],
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Activations at several sites from one forward pass: dict site -> [B, T, d].

    `input_ids` may also be text (a string or a list of strings): it is tokenised with BOS
    first, as the windows are, right-padded with an attention mask (`token_mask(lm, ids, mask)`
    finds the real tokens; `encode_texts` gives both). The forward stops as soon as the last
    requested site is captured, so layers past the deepest site (and the unembedding) never run.
    """
    if isinstance(input_ids, (str, list)):
        input_ids, text_mask = encode_texts(lm.tokenizer, input_ids)
        attention_mask = text_mask if attention_mask is None else attention_mask
    _check_inputs(input_ids, attention_mask)
    parsed = parse_sites(lm, sites)
    input_ids = input_ids.to(lm.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(lm.device)
    if lm.is_bridge:
        return _harvest_bridge(lm, input_ids, parsed, attention_mask)

    acts: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            acts[name] = x.detach()
            if len(acts) == len(parsed):
                raise _StopForward

        return fn

    handles = [_attach(s, site_module(lm.model, s), capture(s.name)) for s in parsed]
    try:
        lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return {s.name: acts[s.name] for s in parsed}


def _harvest_bridge(lm: LanguageModel, input_ids: Tensor, sites: list[Site], attention_mask: Tensor | None) -> dict:
    names = [s.name for s in sites]
    deepest = max(s.layer for s in sites)
    stop = deepest + 1 if deepest + 1 < lm.n_layers else None
    _, cache = lm.model.run_with_cache(
        input_ids, names_filter=names, stop_at_layer=stop, attention_mask=attention_mask
    )
    return {n: cache[n].detach() for n in names}


@contextmanager
def patch_site(lm: LanguageModel, site: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the activation `a` [B, T, d] at `site` is replaced by `fn(a)`.

    Hooks sit on modules, so they act on every forward, including each step of
    `lm.model.generate()` (with a KV cache, T is 1 for generated tokens).
    """
    (parsed,) = parse_sites(lm, site)
    if lm.is_bridge:
        point = lm.model.hook_dict[parsed.name]
        handle = point.add_hook(lambda a, hook: fn(a))
        try:
            yield
        finally:  # remove only our hook; others on the same point stay
            handle.hook.remove()
            point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]
        return
    handle = _attach(parsed, site_module(lm.model, parsed), fn)
    try:
        yield
    finally:
        handle.remove()


def logits(lm: LanguageModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Next-token logits [B, T, vocab] for a transformers model or a bridge alike."""
    _check_inputs(input_ids, attention_mask)
    input_ids = input_ids.to(lm.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(lm.device)
    if lm.is_bridge:
        return lm.model(input_ids, attention_mask=attention_mask)
    return lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def token_mask(lm: LanguageModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Bool [B, T]: True for ordinary tokens, False at BOS, padding and other special tokens."""
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    keep = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        keep &= attention_mask.to(device=input_ids.device).bool()
    return keep
