"""`sae` command line: `sae train` here (flags from the config dataclasses); every other subcommand
lives in its own module with an `add_parser(subparsers)` function, listed in `build_parser`."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import atomicfs
from sae.app import cache_cmd, eval_cmd, features_cmd, generate_cmd, probe_cmd, sensitivity_cmd, sites_cmd, steer_cmd
from sae.app.run import RUN_CONFIG, DataConfig, RunConfig
from sae.config import SAEConfig, TrainConfig

MAIN_JOB = Path(__file__).with_name("main_job.yaml")
SECTIONS = {"sae": SAEConfig, "train": TrainConfig, "data": DataConfig, "run": RunConfig}
DERIVED = {"sae": {"d_in", "n_latents"}}  # filled from the data and the run config


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each dataclass field, for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


# How each config field type becomes a flag. A field of any other type fails here, when the parser
# is built, instead of parsing as a string.
FLAG_TYPES: dict[str, dict[str, Any]] = {
    "int": {"type": int},
    "int | None": {"type": int},
    "float": {"type": float},
    "float | None": {"type": float},
    "str": {"type": str},
    "str | None": {"type": str},
    "bool": {"action": argparse.BooleanOptionalAction},
    "list[str] | None": {"type": str, "nargs": "+"},
    "tuple[float, float]": {"type": float, "nargs": 2},
    "list[int] | None": {"type": int, "nargs": "+"},
    "tuple[int, ...]": {"type": int, "nargs": "+"},
    "tuple[int, int, int]": {"type": int, "nargs": 3},
}


def flag_kwargs(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if annotation not in FLAG_TYPES:
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line flag for type {annotation!r}; add it to FLAG_TYPES")
    return dict(FLAG_TYPES[annotation])


def defaults() -> dict[str, dict[str, Any]]:
    """What a bare `sae train` uses: each dataclass's defaults, then the main job's values."""
    values = {
        section: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        for section, cls in SECTIONS.items()
    }
    for section, overrides in read_config_file(str(MAIN_JOB)).items():
        values[section].update(overrides or {})
    return values


def add_config_args(parser: argparse.ArgumentParser, section: str, cls: type, shown: dict[str, Any]) -> None:
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{section} ({cls.__name__})", (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        if f.name in DERIVED.get(section, ()):
            continue
        default = shown.get(f.name)
        if isinstance(default, tuple):
            default = " ".join(map(str, default))
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"{section}.{f.name}",
            default=argparse.SUPPRESS,
            help=f"{docs.get(f.name, '')} (default: {default})",
            **flag_kwargs(cls, f),
            **({} if f.type == "bool" else {"metavar": f.name.upper()}),
        )


def section_values(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The flags of one config section that were given on the command line."""
    prefix = f"{section}."
    return {key[len(prefix):]: value for key, value in vars(args).items() if key.startswith(prefix)}


def read_config_file(path: str) -> dict[str, dict[str, Any]]:
    import yaml

    text = Path(path).read_text()
    is_yaml = path.endswith((".yaml", ".yml"))
    try:
        data = (yaml.safe_load(text) or {}) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}: {reason}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping with sections {sorted(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; use {sorted(SECTIONS)}")
    bad = [name for name, values in data.items() if values is not None and not isinstance(values, dict)]
    if bad:
        raise ValueError(f"{path}: section(s) {bad} must be mappings of field: value")
    return data


def collect_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The main job's values, then the config file (or the resumed run's saved config), then flags."""
    sections = {name: {} for name in SECTIONS}
    layers = [read_config_file(str(MAIN_JOB))]
    if getattr(args, "resume", None):
        saved_path = Path(args.resume) / RUN_CONFIG
        if not saved_path.is_file():
            raise ValueError(f"{args.resume} has no {RUN_CONFIG}; pass the run directory `sae train` printed")
        saved = json.loads(saved_path.read_text())
        layers.append({name: saved.get(name, {}) for name in SECTIONS})
    elif args.config:
        layers.append(read_config_file(args.config))
    for layer in layers:
        for name, values in layer.items():
            sections[name].update(values or {})
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
    if getattr(args, "resume", None):
        if "train.out_dir" in vars(args):
            raise ValueError("--resume RUN_DIR chooses the run folder; drop --out-dir")
        sections["train"]["out_dir"] = str(args.resume)  # the folder given, even if the run was copied
    return sections


def cmd_train(args: argparse.Namespace) -> int:
    from sae.app.run import train
    from sae.config import from_dict

    sections = collect_sections(args)
    if args.no_wandb:
        sections["run"]["wandb_mode"] = "disabled"
    bad = sorted(DERIVED["sae"] & set(sections["sae"]))
    if bad:
        raise ValueError(f"sae.{bad[0]} is set from the data/run config, not the sae section")
    # Validate every section now, before a model loads (the SAE with placeholder widths).
    probe = {"d_in": 1, "n_latents": max(1, int(sections["sae"].get("k", 32)))}
    SAEConfig.from_dict({**probe, **sections["sae"]})
    result = train(
        sections["sae"],
        from_dict(TrainConfig, sections["train"]),
        from_dict(DataConfig, sections["data"]),
        from_dict(RunConfig, sections["run"]),
        resume=bool(args.resume),
    )
    print(f"\nrun directory: {result.out_dir}")
    if result.wandb_dir:
        print(f"W&B (offline unless --wandb-mode online): {result.wandb_dir}  — upload with `wandb sync`")
    print(f"metrics: {result.out_dir / 'metrics.jsonl'}")
    for site, path in result.checkpoints.items():
        m = result.summary[site]
        line = (
            f"{site}: checkpoint {path / 'sae'}  L0={m.get('l0', float('nan')):.1f}  "
            f"FVU={m.get('fvu', float('nan')):.4f}  dead={m.get('dead_fraction', float('nan')):.3f}"
        )
        if "ce_loss_score" in m:
            line += f"  CE-loss score={m['ce_loss_score']:.3f}  KL score={m['kl_score']:.3f}"
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae", description="Train, cache and evaluate sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train SAEs (defaults: TopK on the embedded model's middle layer, W&B offline)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument(
        "--config",
        help="YAML/JSON file with sections sae/train/data/run, applied over the defaults shown here; "
        "flags override it",
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints and run_config.json")
    train.add_argument("--no-wandb", action="store_true", help="no W&B run (metrics still go to stdout and JSONL)")
    shown = defaults()
    for section, cls in SECTIONS.items():
        add_config_args(train, section, cls, shown[section])
    train.set_defaults(func=cmd_train)
    for command in (cache_cmd, eval_cmd, features_cmd, generate_cmd, probe_cmd, sensitivity_cmd, sites_cmd, steer_cmd):
        command.add_parser(sub)
    return parser


# Bad input and environment problems: every command reports them as one line, not a traceback.
USER_ERRORS = (ValueError, KeyError, OSError, atomicfs.LockedError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"error: {message}") from err


if __name__ == "__main__":
    sys.exit(main())
