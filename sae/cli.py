"""`sae` command line: `sae train`, `sae cache`, `sae eval`. Flags come from the config dataclasses."""
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

from activations.cli import add_cache_parser
from sae.config import SAEConfig, TrainConfig
from sae.run import DataConfig, RunConfig

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


def _arg_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse type and extra kwargs for a (string) dataclass annotation."""
    text = str(annotation)
    if text.startswith("bool"):
        return None, {"action": argparse.BooleanOptionalAction}
    if text.startswith(("list", "tuple")):
        inner = float if "float" in text else int if "int]" in text else str
        return inner, {"nargs": "+"}
    for name, kind in (("int", int), ("float", float)):
        if text.startswith(name):
            return kind, {}
    return str, {}


def add_config_args(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{section} ({cls.__name__})", (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        if f.name in DERIVED.get(section, ()):
            continue
        kind, extra = _arg_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"{section}.{f.name}",
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{docs.get(f.name, '')} (default: {default})",
            **extra,
        )


def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: {path}: unknown section(s) {unknown}; use {sorted(SECTIONS)}")
    return data


def collect_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Config-file values, overridden by any flags given on the command line."""
    sections = {name: {} for name in SECTIONS}
    if getattr(args, "resume", None):
        saved_path = Path(args.resume) / "run_config.json"
        if not saved_path.is_file():
            raise SystemExit(f"error: {args.resume} has no run_config.json; pass the run directory `sae train` printed")
        saved = json.loads(saved_path.read_text())
        base = {name: saved.get(name, {}) for name in SECTIONS}
    else:
        base = load_config_file(args.config or str(MAIN_JOB))
    for name, values in base.items():
        sections[name].update(values or {})
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
    return sections


def cmd_train(args: argparse.Namespace) -> int:
    from sae.config import from_dict
    from sae.run import train

    sections = collect_sections(args)
    if args.no_wandb:
        sections["run"]["wandb_mode"] = "disabled"
    bad = sorted(DERIVED["sae"] & set(sections["sae"]))
    if bad:
        raise SystemExit(f"error: sae.{bad[0]} is set from the data/run config, not the sae section")
    try:
        # Validate the SAE fields now, before a model loads, with placeholder widths.
        probe = {"d_in": 1, "n_latents": max(1, sections["sae"].get("k", 32))}
        SAEConfig.from_dict({**probe, **sections["sae"]})
        result = train(
            sections["sae"],
            from_dict(TrainConfig, sections["train"]),
            from_dict(DataConfig, sections["data"]),
            from_dict(RunConfig, sections["run"]),
            resume=bool(args.resume),
        )
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
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


def cmd_eval(args: argparse.Namespace) -> int:
    import activations
    import analysis
    from sae.checkpoint import load_sae
    from sae.logging import RunLogger

    overrides = {"n_tokens": args.n_tokens}
    for part in ("downstream", "absorption", "probing", "contrastive"):
        overrides[part] = getattr(args, part)
    reports: dict[str, dict] = {}
    models: dict[str, object] = {}
    out_dir = Path(args.out)
    for path in args.checkpoints:
        try:
            model = load_sae(path, device=args.device)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from err
        site = args.site or model.metadata.get("site")
        model_name = args.model or model.metadata.get("model")
        if site is None:
            raise SystemExit(f"error: {path} does not record its hook site; pass --site")
        if model_name not in models:
            models[model_name] = activations.load_model(model_name, device=args.device)
        name = Path(path).resolve().parent.name if Path(path).name == "sae" else Path(path).name
        print(f"evaluating {path} on {model_name or 'the default model'} at {site} ...", flush=True)
        report = analysis.evaluate(model, models[model_name], site, **overrides)
        target = out_dir / name
        analysis.save_report(report, target / "report.json")
        plots = analysis.write_plots(report, target)
        print(f"  report: {target / 'report.json'}; plots: {', '.join(str(p) for p in plots)}")
        reports[name] = report
    if args.wandb_mode != "disabled":
        logger = RunLogger(out_dir, wandb_mode=args.wandb_mode, run_name="eval", console=False)
        for name, report in reports.items():
            scalars = {f"{name}/{k}": v for k, v in report.items() if isinstance(v, (int, float))}
            logger.summary(scalars)
        logger.finish()
    print()
    print(analysis.compare_table(reports))
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
        help="YAML/JSON file with sections sae/train/data/run; flags override it "
        f"(without it: {MAIN_JOB.name}, the quick main job)",
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints and run_config.json")
    train.add_argument("--no-wandb", action="store_true", help="no W&B run (metrics still go to stdout and JSONL)")
    for section, cls in SECTIONS.items():
        add_config_args(train, section, cls)
    train.set_defaults(func=cmd_train)
    add_cache_parser(sub)

    evaluate = sub.add_parser(
        "eval", help="evaluate SAE checkpoints (JSON report, plots, comparison table)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("checkpoints", nargs="+", help="SAE directories (or training checkpoint directories)")
    evaluate.add_argument("--model", help="model the SAEs read (default: the one recorded in the checkpoint)")
    evaluate.add_argument("--site", help="hook site (default: the one recorded in the checkpoint)")
    evaluate.add_argument("--n-tokens", type=int, default=8192, help="tokens for reconstruction and CE/KL metrics")
    for part, what in (
        ("downstream", "CE-loss / KL scores with the SAE spliced in"),
        ("absorption", "first-letter feature absorption"),
        ("probing", "sparse probing"),
        ("contrastive", "contrastive interpretability score"),
    ):
        evaluate.add_argument(f"--{part}", action=argparse.BooleanOptionalAction, default=True, help=what)
    evaluate.add_argument("--out", default="eval", help="directory for reports and plots")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
