"""Configuration dataclasses, split by concern: the SAE itself and its training."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sae import registry

KERNEL_BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass
class SAEConfig:
    """What an SAE is: its shape, architecture and loss. Saved as `config.json` beside the weights."""

    d_in: int
    """Width of the activations the SAE reads (e.g. the model's d_model)."""
    n_latents: int
    """Number of dictionary latents (features)."""
    architecture: str = "topk"
    """A registered architecture: topk, batchtopk, jumprelu, relu (`sae.architectures()` lists all)."""
    k: int = 32
    """Active latents per token: exactly (topk, abstopk, kronsae; matryoshka's default budget),
    on average over a batch (batchtopk, adaptivek), at most (topafa), or the target L0 that the
    sparsity penalty steers toward (jumprelu)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss per token; None means d_in // 2 (topk family only)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (topk family only)."""
    sparsity_coeff: float | None = None
    """Weight of the sparsity penalty: (L0/k - 1)^2 for jumprelu, decoder-norm-weighted L1 for
    relu, the norm-matching AFA loss for topafa; None takes the architecture's default."""
    bandwidth: float = 0.5
    """JumpReLU: width of the rectangle kernel of the straight-through estimators, relative to
    the median threshold (so it has the pre-activations' units whatever the data's scale)."""
    threshold_init: float = 0.1
    """JumpReLU: per-latent threshold before training; the trainer replaces it on the first batch
    with each latent's quantile that makes it fire on k/n_latents of the tokens."""
    k_values: list[int] | None = None
    """Matryoshka: the budgets trained jointly (each a prefix of the k_max strongest codes);
    None takes k/4, k/2 and k. The SAE is usable at any k up to the largest."""
    kron_factors: list[int] | None = None
    """KronSAE: (m, n), each head's m x n latents are mAND pairs of m and n projections;
    None takes (4, 4). n_latents must be a multiple of m * n."""
    kernel_backend: str = "auto"
    """How to run the sparse encode/decode here, not part of what the SAE is (checkpoints do not
    store it): auto (Triton on CUDA; on CPU the native fused TopK training step where it applies,
    else torch), torch (the torch ops under autograd), triton, or reference (plain dense autograd,
    for debugging)."""

    def __post_init__(self) -> None:
        registry.get(self.architecture)  # raises, listing the known names
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"unknown kernel_backend {self.kernel_backend!r}; choose one of {', '.join(KERNEL_BACKENDS)}"
            )
        for name in ("d_in", "n_latents", "k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} is larger than n_latents={self.n_latents}; lower k or raise n_latents")
        if self.bandwidth <= 0 or self.threshold_init <= 0:
            raise ValueError("bandwidth and threshold_init must be positive")
        registry.get(self.architecture).check_config(self)

    @property
    def effective_sparsity_coeff(self) -> float:
        if self.sparsity_coeff is not None:
            return self.sparsity_coeff
        return {"jumprelu": 1.0, "relu": 0.3}.get(self.architecture, 0.0)

    @property
    def effective_k_aux(self) -> int:
        k_aux = self.d_in // 2 if self.k_aux is None else self.k_aux
        return max(1, min(k_aux, self.n_latents))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        return from_dict(cls, data)


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, dead-latent tracking, logging and checkpoints."""

    lr: float | None = None
    """Adam learning rate; None scales 2e-4 by 1/sqrt(n_latents / 16384) (OpenAI's TopK rule)."""
    steps: int | None = None
    """Total optimiser steps, for the LR schedule; None takes len(batches) when it has one."""
    warmup_steps: int = 100
    """Linear LR warm-up from 0."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the LR decays linearly to 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    normalize_inputs: bool = True
    """Scale inputs so their mean norm is sqrt(d_in); the scale is folded into saved weights."""
    b_dec_init: str = "geometric_median"
    """Initialise b_dec from the first batch: geometric_median, mean, or zeros."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (and gets AuxK)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    log_every: int = 50
    """Log metrics every N steps."""
    eval_every: int | None = None
    """Run the trainer's evaluator (e.g. CE-loss score with the SAE spliced in) every N steps."""
    checkpoint_every: int | None = None
    """Save a checkpoint every N steps (None: only at the end and on Ctrl-C)."""
    out_dir: str | None = None
    """Where checkpoints go; None keeps everything in memory."""
    seed: int = 0
    """Seed of torch's RNG: `Trainer` sets it when built (a resumed one restores the saved RNG
    state instead), and `sae train` sets it before building the SAEs, so their weight
    initialisation repeats too (in Python, call torch.manual_seed(seed) before sae.create)."""

    def __post_init__(self) -> None:
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "dead_tokens"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value}")
        if self.warmup_steps < 0 or not 0 <= self.decay_fraction <= 1 or self.grad_clip < 0:
            raise ValueError("warmup_steps and grad_clip must be >= 0 and decay_fraction in [0, 1]")
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), e.g. 0.9 0.999; got {self.adam_betas}")

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / (n_latents / 2**14) ** 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, data)


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass, rejecting unknown keys (listing the known ones) and missing
    required ones."""
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{cls.__name__} needs field(s) {missing}")
    return cls(**data)
