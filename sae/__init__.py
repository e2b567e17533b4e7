"""Sparse autoencoders: architectures, training, checkpoints."""
# Importing each architecture's module registers it (sae.registry).
# This order is `sae.architectures()`'s.
from sae import topk, batchtopk, jumprelu, relu, abstopk, matryoshka, topafa, adaptivek, kronsae, transcoder  # noqa: F401, I001
from sae.abstopk import AbsTopKSAE
from sae.adaptivek import AdaptiveKSAE
from sae.base import BaseSAE, SAEOutput, fvu
from sae.batchtopk import BatchTopKSAE
from sae.checkpoint import load_sae as load
from sae.config import SAEConfig, TrainConfig
from sae.jumprelu import JumpReLUSAE
from sae.kronsae import KronSAE
from sae.matryoshka import MatryoshkaSAE
from sae.registry import architectures, create
from sae.relu import ReLUSAE
from sae.topafa import TopAFASAE
from sae.topk import TopKSAE
from sae.topk_family import TopKFamilySAE
from sae.trainer import Trainer, fit_many
from sae.transcoder import SkipTranscoder, Transcoder

__all__ = [
    "AbsTopKSAE", "AdaptiveKSAE", "BaseSAE", "BatchTopKSAE", "JumpReLUSAE", "KronSAE", "MatryoshkaSAE", "ReLUSAE", "SAEConfig", "SAEOutput", "SkipTranscoder", "TopAFASAE",
    "TopKFamilySAE", "TopKSAE", "TrainConfig", "Trainer", "Transcoder", "architectures", "create", "fit_many", "fvu", "load",
]
