"""Shared fixtures: tiny random language models (no download) and the embedded default model."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import activations

TINY_VOCAB = 512
TINY_D = 64
TINY_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE trained offline on stdlib docstrings, with SmolLM2's special
    tokens and ids (BOS `<|im_start|>` = 1, pad = eos = `<|im_end|>` = 2). Saved and reloaded
    from a folder, as TransformerLens re-loads tokenizers by their path."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(activations.default_texts(limit=200), trainer)
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _tiny_config(family: str, vocab: int):
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        return LlamaConfig(
            hidden_size=TINY_D, intermediate_size=128, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=TINY_D, intermediate_size=128, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=TINY_D, n_layer=TINY_LAYERS, n_head=4, n_positions=256, **common)
    if family == "neox":
        return GPTNeoXConfig(
            hidden_size=TINY_D, intermediate_size=128, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
            max_position_embeddings=256, **common,
        )
    raise ValueError(family)


_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel, "neox": GPTNeoXForCausalLM}
FAMILIES = tuple(_CLASSES)


def make_tiny_lm(tokenizer, family: str = "llama", seed: int = 0) -> activations.LanguageModel:
    """A tiny randomly initialised causal LM of the given family, in eval mode, fp32."""
    torch.manual_seed(seed)
    model = _CLASSES[family](_tiny_config(family, len(tokenizer))).eval()
    return activations.wrap_model(model, tokenizer, name=f"tiny-{family}")


@pytest.fixture
def tiny_lm(tiny_tokenizer) -> activations.LanguageModel:
    """Tiny random Llama (4 layers, d_model 64, vocab 512); built fresh per test, so tests may mutate it."""
    return make_tiny_lm(tiny_tokenizer, "llama")


@pytest.fixture(params=FAMILIES)
def tiny_family_lm(request, tiny_tokenizer) -> activations.LanguageModel:
    """The tiny model in each supported family: Llama, Qwen2, GPT-2, GPT-NeoX."""
    return make_tiny_lm(tiny_tokenizer, request.param)


@pytest.fixture(scope="session")
def tiny_windows(tiny_tokenizer) -> torch.Tensor:
    """Token windows [n, 32] from the embedded corpus, BOS first."""
    return activations.token_windows(tiny_tokenizer, activations.default_texts(limit=120), 32)


@pytest.fixture(scope="session")
def default_lm() -> activations.LanguageModel:
    """The embedded SmolLM2-135M-Instruct (fp32, CPU); use with @pytest.mark.real_model and don't mutate it."""
    return activations.load_model()
