"""TransformerLens-style hook-site names mapped onto transformers modules.

A site is `blocks.{L}.hook_{kind}` (or `blocks.{L}.mlp.hook_in`); each kind is read off one
module of decoder layer L: resid_pre = the layer's input, resid_post = its output, attn_out /
mlp_out = the outputs of its attention / MLP submodules, mlp_in = the MLP's input (after its
norm, TransformerLens 4's `blocks.L.mlp.hook_in`; what a transcoder reads to predict mlp_out).
The families differ only in attribute names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .model import LanguageModel

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_in")
# A kind's name after `blocks.{L}.`: TransformerLens 4's names (its `hook_mlp_in` is the MLP
# branch's input *before* the norm, so the MLP's own input is `mlp.hook_in`).
SUFFIXES = {kind: f"hook_{kind}" for kind in KINDS} | {"mlp_in": "mlp.hook_in"}
_KIND_OF = {suffix: kind for kind, suffix in SUFFIXES.items()}
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in SUFFIXES.values()) + r")$")
# Kinds read off a module's input (a pre-hook), not its output.
INPUT_KINDS = ("resid_pre", "mlp_in")
# Paths to the decoder-layer list (Llama/Qwen/Mistral/Gemma, GPT-2, GPT-NeoX, OPT/Falcon-like).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Site:
    """A parsed hook-site name."""

    name: str
    """The full TransformerLens name, e.g. `blocks.3.hook_resid_post`."""
    layer: int
    """Decoder layer index."""
    kind: str
    """One of `KINDS`."""


def site_name(layer: int, kind: str) -> str:
    """The TransformerLens name of a kind at a layer, e.g. (3, "mlp_in") -> blocks.3.mlp.hook_in."""
    return f"blocks.{layer}.{SUFFIXES[kind]}"


_FORMS = "blocks.{L}.{" + ",".join(SUFFIXES.values()) + "}"


def valid_sites(lm: LanguageModel) -> list[str]:
    """Every site name this model supports, layer by layer."""
    return [site_name(layer, kind) for layer in range(lm.n_layers) for kind in KINDS]


def check_site_name(name: str) -> None:
    """Check a site name's form without a model (the layer range needs one: see parse_site)."""
    if not isinstance(name, str) or _SITE_RE.match(name) is None:
        raise ValueError(f"unknown hook site {name!r}; valid: {_FORMS}")


def parse_site(lm: LanguageModel, name: str) -> Site:
    """Parse and check one site name; unknown names raise a one-line ValueError with the valid forms."""
    m = _SITE_RE.match(name) if isinstance(name, str) else None
    if m is None or int(m.group(1)) >= lm.n_layers:
        raise ValueError(
            f"unknown hook site {name!r} for {lm.name}; valid: "
            + _FORMS.replace("{L}", f"{{0..{lm.n_layers - 1}}}")
        )
    return Site(name, int(m.group(1)), _KIND_OF[m.group(2)])


def parse_sites(lm: LanguageModel, names: str | list[str]) -> list[Site]:
    """Parse a site name or a list of them (duplicates removed, order kept)."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("No hook sites given; pass e.g. ['blocks.0.hook_resid_post'] (see valid_sites(lm)).")
    return [parse_site(lm, n) for n in dict.fromkeys(names)]


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():  # unknown family: the ModuleList of n_layers entries
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}; supported families are "
        f"Llama/Qwen/Mistral, GPT-2 and GPT-NeoX (looked for {', '.join(_LAYER_PATHS)})."
    )


def _child(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for n in names:
        module = getattr(layer, n, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"Cannot find the {what} module of {type(layer).__name__} (looked for {', '.join(names)}).")


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module whose input (INPUT_KINDS) or output (other kinds) is the site's activation."""
    layer = decoder_layers(model)[site.layer]
    if site.kind == "attn_out":
        return _child(layer, _ATTN_NAMES, "attention")
    if site.kind in ("mlp_out", "mlp_in"):
        return _child(layer, _MLP_NAMES, "MLP")
    return layer
