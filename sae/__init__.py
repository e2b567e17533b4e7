"""Sparse autoencoders: architectures, training, checkpoints."""
from sae.base import BaseSAE, SAEOutput, fvu
from sae.batchtopk import BatchTopKSAE
from sae.checkpoint import load_sae as load
from sae.config import ARCHITECTURES, SAEConfig, TrainConfig
from sae.jumprelu import JumpReLUSAE
from sae.relu import ReLUSAE
from sae.topk import TopKSAE
from sae.trainer import Trainer, fit_many

_CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE, "relu": ReLUSAE}


def create(cfg: SAEConfig) -> BaseSAE:
    """Build an untrained SAE of the architecture `cfg.architecture` names."""
    return _CLASSES[cfg.architecture](cfg)


__all__ = [
    "ARCHITECTURES", "BaseSAE", "BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "SAEConfig", "SAEOutput",
    "TopKSAE", "TrainConfig", "Trainer", "create", "fit_many", "fvu", "load",
]
