"""`sae eval`: evaluate SAE checkpoints (JSON report, plots, comparison table)."""
from __future__ import annotations

import argparse
from pathlib import Path

import activations
import analysis
from sae.app.data import resolve_device
from sae.app.checkpoint_args import check_fits, load_sae_for_cli, recorded_site_and_model
from sae.logging import RunLogger


def report_names(paths: list[str]) -> list[str]:
    """A unique name per checkpoint, "run/site" from its path (runs/a/SITE/sae -> "a/SITE"), used
    for table rows and report folders; repeats get a "-2", "-3" ... suffix."""
    names: list[str] = []
    for path in paths:
        folder = Path(path).resolve()
        if folder.name == "sae":  # a training checkpoint's usable SAE: runs/<run>/<site>/sae
            folder = folder.parent
        base = f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _evaluations(paths: list[str], site: str | None, device: str):
    """(path, report name, SAE, site or None for the recorded one) to evaluate: an SAE shared by a
    layer group is evaluated at each member site (named run/group/site) unless --site picks one."""
    for path, name in zip(paths, report_names(paths), strict=True):
        model = load_sae_for_cli(path, device)
        members = [] if site else model.metadata.get("sites", [])
        if len(members) > 1:
            for member in members:
                yield path, f"{name}/{member}", model, member
        else:
            yield path, name, model, site


def run(args: argparse.Namespace) -> int:
    chat = args.chat or bool(args.texts) and all(activations.is_chat_file(t) for t in args.texts)
    overrides = {"n_tokens": args.n_tokens, "split": args.split, "chat": chat}
    if args.context_len is not None:
        overrides["context_len"] = args.context_len
    for part in ("downstream", "absorption", "probing", "contrastive"):
        overrides[part] = getattr(args, part)
    device = resolve_device(args.device)
    try:
        if chat:
            texts = list(activations.read_chat_files(args.texts)) if args.texts else None
        else:
            texts = [doc for name in args.texts for doc in activations.named_texts(name)] if args.texts else None
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
    reports: dict[str, dict] = {}
    models: dict[str, object] = {}
    out_dir = Path(args.out)
    for path, name, model, site in _evaluations(args.checkpoints, args.site, device):
        site, model_name = recorded_site_and_model(path, model, site, args.model)
        if model_name not in models:
            models[model_name] = activations.load_model(model_name, device=device)
        lm = models[model_name]
        check_fits(path, model, lm, site)
        print(f"evaluating {path} on {model_name} at {site} ...", flush=True)
        try:
            report = analysis.evaluate(model, lm, site, texts=texts, **overrides)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
        target = out_dir / name
        analysis.save_report(report, target / "report.json")
        plots = analysis.write_plots(report, target)
        text = report["meta"]["text"]
        print(
            f"  {text['tokens']} tokens from {text['documents_read']} documents of the {text['split']!r} split "
            f"of the {text['source']}; report: {target / 'report.json'}; plots: {', '.join(str(p) for p in plots)}"
        )
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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="evaluate SAE checkpoints (JSON report, plots, comparison table)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("checkpoints", nargs="+", help="SAE directories (or training checkpoint directories)")
    evaluate.add_argument("--model", help="model the SAEs read (default: the one recorded in the checkpoint)")
    evaluate.add_argument(
        "--site", help="hook site (default: the one recorded in the checkpoint; each member layer's for a layer-group SAE)"
    )
    evaluate.add_argument("--n-tokens", type=int, default=8192, help="tokens for reconstruction and CE/KL metrics")
    evaluate.add_argument(
        "--texts", nargs="+", metavar="FILE",
        help="evaluate on these .txt / .jsonl files or named sources: docstrings, selfgen, packages (the installed "
        "packages' READMEs, out of domain for both; use --split all) (default: the embedded corpus); chat JSONL "
        "files ({\"messages\": [...]} a line) are read as conversations, as with --chat",
    )
    evaluate.add_argument(
        "--chat", action="store_true",
        help="evaluate on conversations under the model's chat template, each one whole sequence: the "
        "held-out split of the built-in chat set (stdlib Q/A), or of chat JSONL --texts",
    )
    evaluate.add_argument(
        "--context-len", type=int, help="tokens per window, or per conversation with --chat (default: 128)",
    )
    evaluate.add_argument(
        "--split", default="heldout", choices=["heldout", "train", "all"],
        help="which documents of the text to read: heldout (never in training, by a stable hash of each "
        "document), train, or all (e.g. --texts files kept out of training)",
    )
    for part, what in (
        ("downstream", "CE-loss / KL scores with the SAE spliced in"),
        ("absorption", "first-letter feature absorption"),
        ("probing", "sparse probing"),
        ("contrastive", "contrastive interpretability score"),
    ):
        evaluate.add_argument(f"--{part}", action=argparse.BooleanOptionalAction, default=True, help=what)
    evaluate.add_argument("--out", default="eval", help="directory for reports and plots (one folder per run/site)")
    evaluate.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    evaluate.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    evaluate.set_defaults(func=run)
