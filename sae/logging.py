"""Run logging: one W&B run (offline unless the user opts in) plus the same metrics as JSONL and
on stdout, so a run is fully useful without W&B."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunLogger:
    """Sends metric dicts to W&B, a JSONL file and the console, under identical names."""

    def __init__(
        self,
        out_dir: str | os.PathLike | None = None,
        wandb_mode: str = "offline",
        project: str = "sae-toolkit",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        console: bool = True,
        metrics_file: str = "metrics.jsonl",
    ):
        """wandb_mode: offline (default; sync later with `wandb sync`), online, or disabled.
        `metrics_file`: the JSONL file's name in out_dir."""
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {wandb_mode!r}")
        self.console = console
        self.jsonl = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(out_dir) / metrics_file, "a")
        self.run = None
        if wandb_mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=project,
                name=run_name,
                mode=wandb_mode,
                dir=str(out_dir) if out_dir is not None else None,
                config=config or {},
                reinit="finish_previous",
            )

    @property
    def run_dir(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.console:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            tqdm.write(f"step {step}: {shown}")

    def summary(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
