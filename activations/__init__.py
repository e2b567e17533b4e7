"""Language-model activations: loading models, hook sites, text sources, streaming, caching.

```python
lm = activations.load_model()                       # embedded SmolLM2-135M-Instruct
acts = activations.harvest(lm, ids, ["blocks.3.hook_resid_post"])   # ids [B, T], or text
activations.split_of(doc)                           # "train" or "heldout": a stable hash
for batch in activations.stream(lm, site, chat=True, sequential=True):   # FAST: whole chats, template applied
    ...
for batch in activations.stream(lm, ["blocks.15.hook_resid_post"], n_tokens=10**6):
    ...                                             # dict site -> [batch_size, d] float32
activations.write_cache(lm, ["blocks.15.hook_resid_post"], "cache/", n_tokens=10**6)
for x in activations.CachedActivations("cache/").batches(4096):  # [4096, d] tensors, no model
    ...
```
"""

from .buffer import ShuffleBuffer
from .cache import CachedActivations, write_cache
from .chat import (
    chat_token_ids,
    conversation_key,
    default_conversations,
    is_chat_file,
    read_chat_files,
    select_conversations,
)
from .hooks import harvest, logits, patch_site, token_mask
from .mix import NAMED_SOURCES, SELFGEN_CORPUS, interleave, mixed_windows, named_texts, parse_mix
from .model import LanguageModel, cache_dir, default_model_path, load_model, wrap_model
from .package_docs import package_descriptions
from .selfgen import Sampling, generate_corpus, read_manifest
from .sequential import chat_token_mask, pad_samples, sample_batches
from .sites import check_site_name, decoder_layers, parse_site, valid_sites
from .position import StreamPosition
from .stream import stream
from .text import (
    HELDOUT_FRACTION,
    default_texts,
    encode_texts,
    generated_texts,
    hf_dataset_texts,
    iter_token_windows,
    read_text_files,
    select_split,
    split_of,
    token_windows,
)

__all__ = [
    "HELDOUT_FRACTION",
    "CachedActivations",
    "LanguageModel",
    "NAMED_SOURCES",
    "SELFGEN_CORPUS",
    "Sampling",
    "ShuffleBuffer",
    "StreamPosition",
    "cache_dir",
    "chat_token_ids",
    "chat_token_mask",
    "conversation_key",
    "check_site_name",
    "decoder_layers",
    "default_conversations",
    "default_model_path",
    "default_texts",
    "encode_texts",
    "generate_corpus",
    "generated_texts",
    "harvest",
    "hf_dataset_texts",
    "interleave",
    "is_chat_file",
    "iter_token_windows",
    "load_model",
    "logits",
    "mixed_windows",
    "named_texts",
    "package_descriptions",
    "parse_mix",
    "parse_site",
    "pad_samples",
    "patch_site",
    "read_chat_files",
    "read_manifest",
    "read_text_files",
    "sample_batches",
    "select_conversations",
    "select_split",
    "split_of",
    "stream",
    "token_mask",
    "token_windows",
    "valid_sites",
    "wrap_model",
    "write_cache",
]
