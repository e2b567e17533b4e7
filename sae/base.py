"""The interface every SAE architecture shares, and the pieces they have in common."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sae.config import SAEConfig
from sae.distributed import batch_mean, batch_sum

ENCODER_INIT_SCALE = 3**-0.5


@dataclass
class SAEOutput:
    """What `BaseSAE.loss` returns: the total loss, its named parts, and what metrics need."""

    loss: Tensor
    x_hat: Tensor | None
    """The reconstruction (None from the trainer's fused CPU step, which never forms it)."""
    parts: dict[str, Tensor]
    fired: Tensor
    """Indices of the latents that fired anywhere in the batch (for dead-latent tracking)."""
    l0: Tensor
    """Mean number of active latents per token."""
    fire_counts: Tensor | None = field(default=None)
    """Per-latent firing counts over the batch [n_latents] (for density statistics)."""


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained, with the total variance summed over dimensions (over the
    global batch when it spans data-parallel ranks, see `sae.distributed`)."""
    total = batch_sum((x - batch_mean(x)).pow(2).sum())
    return batch_sum((x - x_hat).pow(2).sum()) / total.clamp_min(torch.finfo(x.dtype).tiny)


def check_input(x: Tensor, d_in: int) -> None:
    """Fail early, naming the problem, on activations an SAE cannot be trained or run on."""
    if x.ndim != 2 or x.shape[-1] != d_in:
        raise ValueError(
            f"expected activations of shape [batch, d_in={d_in}], got {tuple(x.shape)}; "
            "flatten batch and sequence dims and check the SAE was built for this site"
        )
    # One sum is cheaper than an elementwise check and is finite when every entry is (unless
    # it overflows, which the exact check below then clears).
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"activations contain NaN or inf (rows {bad}...); check the model's dtype (fp16 overflow) "
            "and drop those tokens before training"
        )


class BaseSAE(nn.Module):
    """An SAE: `encode` to dense codes, `decode` them back, `loss` for training.

    Weights use latent rows for both directions: W_enc [n_latents, d_in], W_dec [n_latents, d_in].
    """

    unit_norm_decoder: bool = True
    """Keep decoder rows at unit norm during training (the trainer enforces it)."""
    data_parallel: bool = True
    """Its loss reads the batch only through per-row terms and `sae.distributed`'s batch sums,
    so data-parallel ranks holding slices of a batch train it exactly as one process would."""
    predicts_target: bool = False
    """A transcoder: trained on (input, target) pairs from two sites, `model(x)` predicts the
    target site's activation (`metadata["target_site"]`) from the input site's."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        w_dec = torch.empty(cfg.n_latents, cfg.d_in)
        nn.init.kaiming_uniform_(w_dec)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # Encoder starts as the decoder's transpose (OpenAI), scaled to nn.Linear's default row
        # norm (1/sqrt(3)): Adam's fixed step then moves it relatively faster early on, which
        # measured 0.52 vs 0.62 FVU after 32 steps on SmolLM2 layer 15 (same as sparsify's init).
        self.W_enc = nn.Parameter(w_dec.clone() * ENCODER_INIT_SCALE)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        # Inputs are multiplied by this before encoding and outputs divided by it after decoding,
        # so training can run on normalised activations while the interface stays in raw units.
        # `save` folds it into the weights (a saved SAE always has scale 1).
        self.register_buffer("input_scale", torch.tensor(1.0))
        # Where the SAE was trained (model, site, ...); saved in config.json, read by `sae eval`.
        self.metadata: dict[str, str] = {}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise a ValueError naming the problem if `cfg` does not suit this architecture."""

    # -- the interface ------------------------------------------------------------------------
    def centered(self, x: Tensor) -> Tensor:
        """The encoder's input: scaled activations minus the decoder bias."""
        return x * self.input_scale - self.b_dec

    def pre_activations(self, x: Tensor) -> Tensor:
        return self.centered(x) @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [N, n_latents] for activations x [N, d_in]."""
        raise NotImplementedError

    @property
    def output_scale(self) -> Tensor:
        """What decoded outputs are divided by: the input's scale for an SAE (a transcoder's target
        has its own)."""
        return self.input_scale

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction [N, d_in] from dense codes z [N, n_latents]."""
        return (z @ self.W_dec + self.b_dec) / self.output_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def decoder_directions(self) -> Tensor:
        """Each latent's contribution to x_hat per unit of code, in raw activation units
        [n_latents, d_in] (what `analysis` steers and measures with)."""
        return self.W_dec / self.output_scale

    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """Training loss on a batch; `dead_mask` [n_latents] marks latents the trainer found dead."""
        raise NotImplementedError

    # -- shared helpers -----------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        check_input(x, self.cfg.d_in)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        """Architecture-specific initialisation from the first training batch (raw activations),
        called once input_scale and b_dec are set. Nothing by default."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore the architecture's constraints after an optimiser step."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient part along each decoder row, which renormalising would undo anyway."""
        grad, w = self.W_dec.grad, self.W_dec
        if grad is None:
            return
        # g -= (g.w / |w|^2) w, in place and with row-chunked dot products: an [n_latents, d_in]
        # temporary is a fresh allocation whose page faults cost more than the arithmetic on CPU.
        dots = torch.cat([torch.linalg.vecdot(g, v) for g, v in zip(grad.split(1024), w.split(1024))])
        grad.addcmul_(w, (dots / w.norm(dim=-1).clamp_min(1e-8).square()).unsqueeze(1), value=-1)

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The state with `input_scale` folded into the weights: same encodings and outputs on raw
        activations, scale 1. Pre-activations are unchanged, so thresholds need no change."""
        state = {name: t.detach().clone() for name, t in self.state_dict().items()}
        scale = state["input_scale"]
        state["W_enc"] *= scale
        state["W_dec"] /= scale
        state["b_dec"] /= scale
        state["input_scale"] = torch.ones_like(scale)
        return state

    def save(self, path: str, format: str = "native") -> None:
        """Save to a folder: ours (`native`), or a `saelens` / `sparsify` folder their loaders read."""
        from sae.checkpoint import save_sae
        from sae.interop import save_peer

        if format == "native":
            save_sae(self, path)
        else:
            save_peer(self, path, format)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device
