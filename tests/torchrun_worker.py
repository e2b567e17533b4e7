"""Started by tests/test_distributed.py under torchrun: `sae train ARGS...` as one rank, then this
rank's SAEs (its final in-memory weights, rank 1's included) go to
$DUMP_DIR/rank<R>/<site>.safetensors. With $STOP_AT_STEP every rank is interrupted (as by
Ctrl-C) when it reaches that step."""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import sae
import sae.app.run as run
from sae.app.cli import main

train, train_step = run.train, sae.Trainer.train_step


def train_and_dump(*args, **kwargs):
    result = train(*args, **kwargs)
    folder = Path(os.environ["DUMP_DIR"]) / f"rank{os.environ['RANK']}"
    folder.mkdir(parents=True, exist_ok=True)
    for site, model in result.models.items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{site}.safetensors"))
    return result


def stopping_step(self, x):
    if self.step == int(os.environ["STOP_AT_STEP"]):
        raise KeyboardInterrupt
    train_step(self, x)


run.train = train_and_dump
if "STOP_AT_STEP" in os.environ:
    sae.Trainer.train_step = stopping_step
sys.exit(main(sys.argv[1:]))
