"""Read and write the checkpoint folders of two peer libraries, SAELens and sparsify.

SAELens: `cfg.json` + `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] and, for JumpReLU, threshold [d_sae]. Architectures read:
topk, jumprelu, standard (ReLU), and batchtopk training checkpoints (scalar `topk_threshold`).
SAELens saves a BatchTopK SAE as JumpReLU with its threshold repeated per latent, and so do we.

sparsify: `cfg.json` + `sae.safetensors` with encoder.weight [num_latents, d_in], encoder.bias,
W_dec [num_latents, d_in] (the same orientation as ours: SAELens' own sparsify reader transposes
it wrongly), b_dec and, with `skip_connection`, W_skip [d_in, d_in]. TopK only: SAEs, and
transcoders (`transcode`: the encoder reads the module's input without subtracting b_dec, and
the output is the module's output) with or without the skip.

Every conversion is exact (no approximation): what cannot be represented exactly is refused with
a message naming it. Both formats carry our own config and metadata under `sae_toolkit` in
cfg.json (the peers ignore the key), so hyperparameters and provenance survive a round trip.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import atomicfs
from sae.checkpoint import CONFIG, load_state, read_json, read_tensors, saved_config, write_tensors
from sae.config import SAEConfig
from sae.registry import create

FORMATS = ("native", "saelens", "sparsify")
PEER_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
OUR_KEY = "sae_toolkit"
# The cfg.json layout we write is SAELens 6's; its loader reads a config without a version as the
# older (pre-6) layout and rewrites it, so the version must be present.
SAELENS_CONFIG_VERSION = "6.0.0"
SAELENS_ARCHITECTURE = {"topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "relu": "standard"}
# sparsify hookpoints (module paths) that name one of our sites.
SPARSIFY_KINDS = {"": "resid_post", ".mlp": "mlp_out", ".self_attn": "attn_out", ".attn": "attn_out"}
# A sparsify transcoder of a hookpoint reads that module's input: our site for it, by output site.
TRANSCODER_INPUT = {"hook_mlp_out": "mlp.hook_in", "hook_resid_post": "hook_resid_pre"}
SPARSIFY_ARCHITECTURES = ("topk", "transcoder", "skip_transcoder")


def detect_format(path: Path) -> str | None:
    """"saelens" or "sparsify" for a peer's folder, None for ours (or for no checkpoint at all)."""
    if (path / CONFIG).is_file() or not (path / PEER_CONFIG).is_file():
        return None
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    raise FileNotFoundError(
        f"{path} has {PEER_CONFIG} but neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify); "
        "copy the weights file next to it"
    )


def check_not_sparsify_run(path: Path) -> None:
    """A sparsify training run holds one folder per hookpoint: ask for one of them."""
    hookpoints = sorted(p.name for p in path.iterdir() if (p / PEER_CONFIG).is_file() and (p / SPARSIFY_WEIGHTS).is_file())
    if hookpoints:
        raise ValueError(
            f"{path} is a sparsify run with one SAE per hookpoint ({', '.join(hookpoints)}); "
            f"load one of them, e.g. {path / hookpoints[0]}"
        )


def load_peer(path: Path, fmt: str):
    """Load a SAELens or sparsify folder as one of our SAEs (on the CPU)."""
    cfg = read_json(path / PEER_CONFIG)
    if fmt == "saelens":
        arch, state, metadata = from_saelens(cfg, read_tensors(path / SAELENS_WEIGHTS), path)
    else:
        arch, state, metadata = from_sparsify(cfg, read_tensors(path / SPARSIFY_WEIGHTS), path)
    saved = our_section(cfg)
    n_latents, d_in = state["W_enc"].shape
    fields = hyperparameters(saved.get("config") or {}, arch, n_latents)
    if arch in ("topk", "transcoder", "skip_transcoder") or (arch == "batchtopk" and cfg.get("k")):
        fields["k"] = peer_k(cfg)
    model = create(SAEConfig.from_dict({**fields, "architecture": arch, "d_in": d_in, "n_latents": n_latents}))
    model.metadata = {**metadata, **(saved.get("metadata") or {})}
    state = {name: t.to(torch.float32) for name, t in state.items()}
    state["input_scale"] = torch.tensor(1.0)
    load_state(model, state, source=path)
    return model


def our_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our config and metadata, if we wrote this folder: top level in sparsify's cfg.json, under
    `metadata` in SAELens' (whose loader drops unknown top-level keys but keeps metadata)."""
    meta = cfg.get("metadata")
    return cfg.get(OUR_KEY) or (meta.get(OUR_KEY) if isinstance(meta, dict) else None) or {}


def hyperparameters(saved: dict[str, Any], arch: str, n_latents: int) -> dict[str, Any]:
    """Our training hyperparameters saved in the folder, if it still holds that architecture
    (a JumpReLU file may have been a BatchTopK SAE); the weights' shapes always win."""
    known = {f.name for f in dataclasses.fields(SAEConfig)} - {"architecture", "d_in", "n_latents", "kernel_backend"}
    kept = {k: v for k, v in saved.items() if k in known} if saved.get("architecture") == arch else {}
    kept["k"] = min(int(kept.get("k", 32)), n_latents)
    return kept


def peer_k(cfg: dict[str, Any]) -> int:
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if not k:
        raise ValueError("a TopK SAE's cfg.json has no k (nor activation_fn_kwargs.k)")
    return int(k)


# -- SAELens --------------------------------------------------------------------------------------
def from_saelens(cfg: dict[str, Any], weights: dict[str, Tensor], path: Path) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    """Our architecture, state (our names and orientation) and metadata from a SAELens folder."""
    where = path / PEER_CONFIG
    arch = cfg.get("architecture") or "standard"
    if arch == "standard" and (cfg.get("activation_fn_str") or cfg.get("activation_fn")) == "topk":
        arch = "topk"  # SAELens < 6 wrote TopK SAEs as standard + activation_fn "topk"
    if arch not in ("topk", "jumprelu", "standard", "batchtopk"):
        raise ValueError(f"{where}: SAELens architecture {arch!r} is not supported; this toolkit reads topk, jumprelu, standard, batchtopk")
    norm = cfg.get("normalize_activations", "none")
    if norm in ("expected_average_only_in", True):
        raise ValueError(
            f"{where}: normalize_activations={norm!r}: the weights expect inputs scaled by a factor this folder does "
            "not hold; fold the scaling into the weights in SAELens (fold_activation_norm_scaling_factor) and save again"
        )
    if norm not in ("none", None, False):
        raise ValueError(
            f"{where}: normalize_activations={norm!r} normalises each input at run time, which no SAE of this "
            "toolkit does (it cannot be folded into the weights); this SAE is not supported"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention-head hook_z SAEs) is not supported")
    if "scaling_factor" in weights and not torch.all(weights["scaling_factor"] == 1):
        raise ValueError(f"{where}: a finetuning scaling_factor is not supported; fold it into W_dec in SAELens and save again")
    activation = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "standard" and activation != "relu":
        raise ValueError(f"{where}: standard SAE with activation_fn={activation!r}; only relu is supported")

    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    check_shapes(weights, expected, where, "SAELens")
    w_enc, b_enc = weights["W_enc"].T, weights["b_enc"]
    w_dec, b_dec = weights["W_dec"], weights["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        # The encoder sees x, not x - b_dec: fold W_enc·b_dec into b_enc so our centring cancels.
        b_enc = b_enc + w_enc @ b_dec
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens multiplies pre-activations by ‖W_dec row‖ (before selecting and thresholding) and
        # divides codes by it again before decoding: the same map as scaling encoder rows up and
        # decoder rows down by that norm.
        norms = w_dec.norm(dim=-1)
        w_enc, b_enc = w_enc * norms[:, None], b_enc * norms
        w_dec = torch.where(norms[:, None] > 0, w_dec / norms.clamp_min(1e-30)[:, None], w_dec)
    state = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}

    our_arch = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}[arch]
    if arch == "jumprelu":
        threshold = saelens_threshold(weights, d_sae, where)
        # SAELens computes relu(pre)·(pre > θ); ours pre·(pre > θ). Equal for θ >= 0, and a
        # negative θ lets exactly the positive pre-activations through, as θ = 0 does.
        state["threshold"] = threshold.clamp_min(0)
        saved = our_section(cfg).get("config") or {}
        if saved.get("architecture") == "batchtopk" and torch.all(threshold == threshold[0]):
            our_arch, state["threshold"] = "batchtopk", threshold[0].clamp_min(0)
    elif arch == "batchtopk":
        if "topk_threshold" not in weights:
            raise ValueError(f"{where}: a SAELens batchtopk checkpoint without topk_threshold cannot encode one token at a time")
        state["threshold"] = weights["topk_threshold"].reshape(())
    # SAELens 6 keeps model and hook under metadata; older versions at the top level.
    meta = {**cfg, **(cfg.get("metadata") or {})}
    metadata = {ours_key: str(meta[key]) for ours_key, key in (("model", "model_name"), ("site", "hook_name")) if meta.get(key)}
    return our_arch, state, metadata


def saelens_threshold(weights: dict[str, Tensor], d_sae: int, where: Path) -> Tensor:
    if "threshold" in weights:
        threshold = weights["threshold"]
    elif "log_threshold" in weights:  # SAELens training checkpoints store the log
        threshold = weights["log_threshold"].exp()
    else:
        raise ValueError(f"{where}: JumpReLU weights have no threshold (nor log_threshold) tensor")
    check_shapes({"threshold": threshold}, {"threshold": (d_sae,)}, where, "SAELens")
    return threshold


def to_saelens(model) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """SAELens cfg.json content and weights for one of our SAEs."""
    arch = model.cfg.architecture
    if arch not in SAELENS_ARCHITECTURE:
        raise ValueError(f"SAELens has no architecture equivalent to {arch!r}; save it in the native format")
    state = model.folded_state_dict()
    n, d = state["W_enc"].shape
    weights = {"W_enc": state["W_enc"].T.contiguous(), "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if arch == "jumprelu":
        weights["threshold"] = state["threshold"]
    if arch == "batchtopk":
        if state["threshold"] < 0:
            raise ValueError(
                "this BatchTopK SAE has no inference threshold yet (it is set while training); "
                "train it for at least one step before saving it in SAELens format"
            )
        weights["threshold"] = state["threshold"].expand(n).clone()
    metadata = {"sae_lens_version": SAELENS_CONFIG_VERSION, OUR_KEY: our_fields(model)}
    if model.metadata.get("model"):
        metadata["model_name"] = model.metadata["model"]
    if model.metadata.get("site"):
        metadata["hook_name"] = model.metadata["site"]
    cfg = {
        "architecture": SAELENS_ARCHITECTURE[arch],
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if arch == "topk":
        cfg.update(k=model.cfg.k, rescale_acts_by_decoder_norm=False)
    return cfg, weights


# -- sparsify -------------------------------------------------------------------------------------
def from_sparsify(cfg: dict[str, Any], weights: dict[str, Tensor], path: Path) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    where = path / PEER_CONFIG
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if skip and not transcode:
        raise ValueError(
            f"{where}: sparsify skip_connection checkpoints that are not transcoders are not supported (this "
            "toolkit's SAEs reconstruct their own input without a skip connection W_skip)"
        )
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: sparsify activation {cfg['activation']!r} is not supported; only topk")
    if cfg.get("signed"):
        raise ValueError(f"{where}: signed (AbsTopK) sparsify SAEs are not supported")
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    check_shapes(weights, expected, where, "sparsify")
    state = {"W_enc": weights["encoder.weight"], "b_enc": weights["encoder.bias"], "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    metadata = {}
    site = sparsify_site(path.name)
    if transcode:  # a transcoder reads the hooked module's input and predicts its output
        state.update(target_scale=torch.tensor(1.0), input_mean=torch.zeros(d_in), **({"W_skip": weights["W_skip"]} if skip else {}))
        if site:
            metadata["target_site"] = site
            block, kind = site.rsplit(".", 1)
            site = f"{block}.{TRANSCODER_INPUT[kind]}" if kind in TRANSCODER_INPUT else None  # attention: no input site
    if site:
        metadata["site"] = site
    run_config = path.parent / CONFIG  # a sparsify run's TrainConfig, beside the hookpoint folders
    if run_config.is_file():
        model_name = json.loads(run_config.read_text()).get("model")
        if model_name:
            metadata["model"] = str(model_name)
    return ("skip_transcoder" if skip else "transcoder") if transcode else "topk", state, metadata


def sparsify_site(hookpoint: str) -> str | None:
    """Our site name for a sparsify hookpoint folder such as `layers.15` or `layers.15.mlp`."""
    for suffix, kind in SPARSIFY_KINDS.items():
        head = hookpoint[: len(hookpoint) - len(suffix)] if suffix and hookpoint.endswith(suffix) else hookpoint
        if (suffix == "" or hookpoint.endswith(suffix)) and head.startswith(("layers.", "layers_")) and head[7:].isdigit():
            return f"blocks.{int(head[7:])}.hook_{kind}"
    return None


def to_sparsify(model) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if model.cfg.architecture not in SPARSIFY_ARCHITECTURES:
        raise ValueError(
            f"sparsify stores TopK SAEs and transcoders only; save this {model.cfg.architecture} SAE with "
            "format='saelens' or the native format"
        )
    state = model.folded_state_dict()
    n, d = state["W_enc"].shape
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, n // d),
        "normalize_decoder": True,
        "num_latents": n,
        "k": model.cfg.k,
        "multi_topk": False,
        "skip_connection": "W_skip" in state,
        "transcode": model.predicts_target,
        "d_in": d,
        OUR_KEY: our_fields(model),
    }
    # The folded state reads raw activations (a transcoder's input_mean is folded into b_enc).
    weights = {"encoder.weight": state["W_enc"], "encoder.bias": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if "W_skip" in state:
        weights["W_skip"] = state["W_skip"]
    return cfg, weights


# -- shared ---------------------------------------------------------------------------------------
def our_fields(model) -> dict[str, Any]:
    return {"config": saved_config(model.cfg), "metadata": dict(model.metadata)}


def check_shapes(weights: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: Path, library: str) -> None:
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{where.parent}: {library} weights lack {missing} (found {sorted(weights)})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{where.parent}: {library} tensor {name} has shape {tuple(weights[name].shape)}, but {where.name} "
                f"implies {shape}; the weights are transposed or come from another SAE"
            )


def save_peer(model, path: str | os.PathLike, fmt: str) -> None:
    """Write `model` as a SAELens or sparsify folder; the folder appears whole or not at all."""
    if fmt not in FORMATS[1:]:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg, weights = to_saelens(model) if fmt == "saelens" else to_sparsify(model)
    weights_name = SAELENS_WEIGHTS if fmt == "saelens" else SPARSIFY_WEIGHTS

    def build(tmp: Path) -> None:
        # safetensors' metadata "format": "pt" is what torch-saved files carry (sparsify's writer adds it).
        write_tensors(tmp / weights_name, {k: v.float() for k, v in weights.items()}, metadata={"format": "pt"})
        atomicfs.write_json(tmp / PEER_CONFIG, cfg)

    atomicfs.replace_dir(Path(path), build)
