"""`sae sites [MODEL]`: the hook sites a model offers, one line per kind with its layer range."""
from __future__ import annotations

import argparse

from activations import LanguageModel, load_model
from activations.sites import INPUT_KINDS, KINDS, SUFFIXES, Site, decoder_layers, site_module, site_name


def site_modules(lm: LanguageModel) -> dict[str, str]:
    """Kind -> the module its sites read, as a pattern over layers `{L}` (or why it is unavailable).
    Every layer is resolved, so a kind listed as available works at every layer."""
    model = lm.model.original_model if lm.is_bridge else lm.model
    names = {id(module): name for name, module in model.named_modules()}
    layers = names[id(decoder_layers(model))]
    found = {}
    for kind in KINDS:
        try:
            modules = [site_module(model, Site(site_name(layer, kind), layer, kind)) for layer in range(lm.n_layers)]
        except ValueError as err:
            found[kind] = f"unavailable: {err}"
            continue
        where = "input of" if kind in INPUT_KINDS else "output of"
        found[kind] = f"{where} {layers}.{{L}}{names[id(modules[0])][len(layers) + 2:]}"
    return found


def run(args: argparse.Namespace) -> int:
    try:
        lm = load_model(args.model)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot load model {args.model!r}: {err}") from err
    modules = site_modules(lm)
    if args.names:
        available = [kind for kind in KINDS if not modules[kind].startswith("unavailable")]
        lines = [site_name(layer, kind) for layer in range(lm.n_layers) for kind in available]
    else:
        lines = [f"{lm.name}: {lm.n_layers} layers, d_model {lm.d_model}"]
        lines += [f"  blocks.{{0..{lm.n_layers - 1}}}.{SUFFIXES[kind]:<17} {where}" for kind, where in modules.items()]
    print("\n".join(lines))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `sites` on the `sae` CLI's subparsers."""
    p = subparsers.add_parser(
        "sites",
        help="list a model's valid hook sites",
        description="List the hook sites (TransformerLens names) of a model, one line per kind with the "
        "layer range and the module each reads.",
    )
    p.add_argument("model", nargs="?", default=None, help="HF model id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--names", action="store_true", help="print every site name, one per line (for scripts)")
    p.set_defaults(func=run)
