"""`evaluate`: every SAE metric of the suite in one JSON-able report."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import activations

from .absorption import AbsorptionConfig, absorption_eval
from .contrastive import contrastive_eval
from .downstream import downstream_scores, downstream_sums
from .metrics import ReconstructionStats, density_stats, max_decoder_cosine
from .probing import ProbingConfig, sparse_probing
from .reliability import ReliabilityConfig, reliability_flags


@dataclass
class EvalConfig:
    """What `evaluate` measures and on how much data."""

    n_tokens: int = 8192
    """Tokens (before dropping BOS / pad / EOS) for the reconstruction, density and CE/KL metrics."""
    split: str = "heldout"
    """Which documents of the text to read: "heldout" (never seen in training; see
    activations.split_of), "train", or "all" (no filtering, e.g. for a file only used for evals)."""
    heldout_fraction: float = activations.HELDOUT_FRACTION
    """Share of documents in the held-out split; must match the one training used."""
    context_len: int = 128
    """Tokens per window, BOS first."""
    batch_size: int = 8
    """Windows per forward pass."""
    chat: bool = False
    """Texts are conversations (lists of {role, content} messages; None: the built-in chat set),
    each read whole as one sequence under the model's chat template, cut at context_len (the
    FAST format); its first token and padding are masked, the template's tokens kept."""
    dense_threshold: float = 0.1
    """A latent firing on more than this share of tokens counts as dense."""
    decoder_cosine_threshold: float = 0.9
    """Latents whose decoder row has a cosine above this with another latent count as near-duplicates."""
    downstream: bool = True
    """Splice the SAE into the model for the CE-loss / KL scores (three full forwards per batch)."""
    absorption: bool = True
    """Run the first-letter feature-absorption eval."""
    probing: bool = True
    """Run sparse probing on the shipped datasets."""
    contrastive: bool = True
    """Run the contrastive interpretability score on the shipped story pairs."""
    absorption_cfg: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    """Settings of the absorption eval."""
    probing_cfg: ProbingConfig = field(default_factory=ProbingConfig)
    """Settings of the sparse-probing eval."""
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    """When a result is flagged unreliable (listed in the report's `warnings` and `unreliable`)."""
    progress: bool = True
    """Show a progress bar per stage."""


def _config(config: EvalConfig | None, overrides: dict) -> EvalConfig:
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown evaluate option(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(config or EvalConfig(), **overrides)


class _Counted:
    """Iterates documents, counting how many were taken."""

    def __init__(self, docs: Iterable[str]) -> None:
        self.docs, self.n = iter(docs), 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> str:
        doc = next(self.docs)
        self.n += 1
        return doc


def _chat_samples(lm: activations.LanguageModel, texts: Iterable | None, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The eval's conversations of `cfg.split`, in order until `cfg.n_tokens` tokens, as right-padded
    ids, their kept-token mask (`chat_token_mask`), and what they came from."""
    activations.chat.check_chat_template(lm.tokenizer, lm.name)
    source = "built-in chat set" if texts is None else "given conversations"
    texts = activations.default_conversations() if texts is None else texts
    convs = _Counted(activations.select_conversations(texts, cfg.split, cfg.heldout_fraction))
    samples, total = [], 0
    for ids in activations.chat_token_ids(lm.tokenizer, convs, chunk=1):
        samples.append(ids[: cfg.context_len])
        total += len(samples[-1])
        if total >= cfg.n_tokens:
            break
    if not samples:
        raise ValueError(f"The {cfg.split!r} split of the {source} holds no conversation; pass more, or split='all'.")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask = activations.pad_samples(samples, pad)
    text = {
        "source": source, "split": cfg.split, "heldout_fraction": cfg.heldout_fraction, "documents_read": convs.n,
        "windows": len(samples), "tokens": total, "tokens_requested": cfg.n_tokens, "chat": True,
    }
    return ids, activations.chat_token_mask(mask), text


def _windows(lm: activations.LanguageModel, texts: Iterable[str] | None, cfg: EvalConfig) -> tuple[torch.Tensor, dict]:
    """The eval's token windows from the `cfg.split` documents, and what they came from."""
    source = "embedded corpus" if texts is None else "given texts"
    texts = activations.default_texts() if texts is None else texts
    docs = _Counted(activations.select_split(texts, cfg.split, cfg.heldout_fraction))
    n = max(1, cfg.n_tokens // cfg.context_len)
    # One document per tokenizer call, so the count says exactly how many documents were read.
    windows = list(itertools.islice(activations.iter_token_windows(lm.tokenizer, docs, cfg.context_len, chunk_docs=1), n))
    if not windows:
        raise ValueError(
            f"The {cfg.split!r} split of the {source} gave no full window of {cfg.context_len} tokens; pass more "
            "text, a smaller context_len, or split='all' to read every document."
        )
    text = {
        "source": source, "split": cfg.split, "heldout_fraction": cfg.heldout_fraction, "documents_read": docs.n,
        "windows": len(windows), "tokens": len(windows) * cfg.context_len, "tokens_requested": cfg.n_tokens,
    }
    return torch.stack(windows), text


@torch.no_grad()
def _token_metrics(
    model: torch.nn.Module, lm: activations.LanguageModel, site: str, windows: torch.Tensor, cfg: EvalConfig,
    keep_mask: torch.Tensor | None = None,
    target_site: str | None = None,
) -> tuple[dict, torch.Tensor]:
    """Reconstruction (+ CE/KL) metrics over the windows (at `keep_mask`, default `token_mask`),
    and the per-latent firing density. With `target_site` (a transcoder), the metrics compare its
    prediction with that site's activation."""
    param = next(model.parameters())
    stats = ReconstructionStats(model.cfg.d_in, model.cfg.n_latents)
    sums: dict[str, float] = {}
    bar = tqdm(windows.split(cfg.batch_size), desc="eval: reconstruction" + (" + CE/KL" if cfg.downstream else ""),
               unit="batch", disable=not cfg.progress)
    keeps = keep_mask.split(cfg.batch_size) if keep_mask is not None else itertools.repeat(None)
    for ids, keep in zip(bar, keeps):
        keep = activations.token_mask(lm, ids) if keep is None else keep
        acts = activations.harvest(lm, ids, [site] if target_site is None else [site, target_site])
        x, y = (acts[s][keep.to(lm.device)].to(param.device, param.dtype) for s in (site, target_site or site))
        z = model.encode(x)
        stats.update(y, model.decode(z) if target_site is None else model(x), z)
        if cfg.downstream:
            for k, v in downstream_sums(model, lm, site, ids, keep, target_site).items():
                sums[k] = sums.get(k, 0.0) + v
    out = stats.result()
    if cfg.downstream:
        out.update(downstream_scores(sums))
    return out, stats.density()


def evaluate(
    model: torch.nn.Module,
    lm: activations.LanguageModel,
    site: str,
    texts: Iterable[str] | None = None,
    config: EvalConfig | None = None,
    target_site: str | None = None,
    **overrides,
) -> dict:
    """Evaluate an SAE trained on `site` of `lm`; returns a JSON-able report.

    A transcoder (`target_site` given, or recorded as `metadata["target_site"]`) reads `site` and
    predicts `target_site`: fvu and the other reconstruction metrics compare its prediction with
    the target's activation, and the CE/KL scores splice the prediction in place of the target.

    Top level: scalar metrics (l0, fvu, explained_variance, mse, cosine, l2_ratio,
    relative_reconstruction_bias, ce_loss_score, kl_score, delta_ce, dead_fraction,
    dense_fraction, max_decoder_cosine_mean, ...), sub-reports `absorption`, `probing`,
    `contrastive`, per-latent lists `latent_density` and `max_decoder_cosine`, `warnings`
    (why a result should not be trusted), `unreliable` (the dotted names of those results,
    still reported) and `meta` (`meta.text`: split, documents and tokens read).
    texts default to the embedded corpus; only their held-out documents are read unless
    `split` says otherwise. Keyword overrides set EvalConfig fields (e.g. `n_tokens=2048,
    absorption=False, split="all"`).
    """
    cfg = _config(config, overrides)
    if model.cfg.d_in != lm.d_model:
        raise ValueError(
            f"The SAE reads d_in={model.cfg.d_in} but {lm.name} has d_model={lm.d_model}; "
            "evaluate it on the model and site it was trained on."
        )
    target_site = target_site or getattr(model, "metadata", {}).get("target_site")
    if getattr(model, "predicts_target", False) and target_site is None:
        raise ValueError("This transcoder records no target site; pass target_site= (e.g. blocks.L.hook_mlp_out).")
    model.eval()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.chat:
        windows, keep, text_meta = _chat_samples(lm, texts, cfg)
    else:
        (windows, text_meta), keep = _windows(lm, texts, cfg), None
    report, density = _token_metrics(model, lm, site, windows, cfg, keep, target_site)
    report.update(density_stats(density, cfg.dense_threshold))
    max_cos = max_decoder_cosine(model.decoder_directions())
    report["max_decoder_cosine_mean"] = float(max_cos.mean())
    report[f"decoder_cosine_above_{cfg.decoder_cosine_threshold:g}_fraction"] = float(
        (max_cos > cfg.decoder_cosine_threshold).float().mean()
    )
    seconds["tokens"] = time.perf_counter() - start
    for name, enabled, run in (
        ("absorption", cfg.absorption, lambda: absorption_eval(model, lm, site, cfg.absorption_cfg, cfg.progress)),
        ("probing", cfg.probing, lambda: sparse_probing(model, lm, site, cfg.probing_cfg, cfg.progress)),
        ("contrastive", cfg.contrastive,
         lambda: contrastive_eval(model, lm, site, cfg.probing_cfg.batch_size, cfg.progress)),
    ):
        if enabled:
            start = time.perf_counter()
            report[name] = run()
            seconds[name] = time.perf_counter() - start
    report["warnings"], report["unreliable"] = reliability_flags(report, text_meta, cfg.reliability)
    report["latent_density"] = density.tolist()
    report["max_decoder_cosine"] = max_cos.tolist()
    report["meta"] = {
        "model": lm.name,
        "site": site,
        **({"target_site": target_site} if target_site else {}),
        "text": text_meta,
        "sae_config": dataclasses.asdict(model.cfg),
        "eval_config": dataclasses.asdict(cfg),
        "seconds": seconds,
    }
    return report
