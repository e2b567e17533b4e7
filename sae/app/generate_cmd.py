"""`sae generate`: sample a self-generated text corpus (FaithfulSAE) from a model into a JSONL file."""

from __future__ import annotations

import argparse

from activations import Sampling, generate_corpus, load_model, read_manifest
from sae.app.data import resolve_device


def run(args: argparse.Namespace) -> int:
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size
    )
    if args.tokens < 1:
        raise ValueError(f"--tokens must be a positive integer, got {args.tokens}")
    if not args.out.endswith(".jsonl"):
        raise ValueError(f"--out must name a .jsonl file (read back by --texts), got {args.out}")
    lm = load_model(args.model, device=resolve_device(args.device))
    path = generate_corpus(lm, args.tokens, args.out, seed=args.seed, sampling=sampling)
    manifest = read_manifest(path)
    print(f"wrote {path}: {manifest['n_documents']} documents, {manifest['n_tokens']} tokens (seed {args.seed})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` on the `sae` CLI's subparsers (its handler is `args.func(args)`)."""
    defaults = Sampling()
    p = subparsers.add_parser(
        "generate",
        help="sample text from the model itself (self-generated training data) into a JSONL file",
        description="Sample documents from the model, each starting from BOS alone (FaithfulSAE), into a "
        "JSONL file with a manifest beside it (model, seed, sampling). A matching existing file is reused. "
        "Train on it with `sae train --texts FILE` or mix it: `--texts docstrings:0.5 FILE:0.5`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", type=int, required=True, help="tokens to generate (as the tokenizer re-reads the text)")
    p.add_argument("--out", required=True, help="the .jsonl file to write (its manifest goes beside it)")
    p.add_argument("--model", default=None, help="HF model id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="longest document")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus mass kept (1: plain sampling)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="documents sampled together")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.set_defaults(func=run)
