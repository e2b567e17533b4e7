"""Language-model activations: loading models, hook sites, text sources, streaming, caching.

```python
lm = activations.load_model()                       # embedded SmolLM2-135M-Instruct
acts = activations.harvest(lm, ids, ["blocks.3.hook_resid_post"])   # ids [B, T], or text
activations.split_of(doc)                           # "train" or "heldout": a stable hash
for batch in activations.stream(lm, ["blocks.15.hook_resid_post"], n_tokens=10**6):
    ...                                             # dict site -> [batch_size, d] float32
activations.write_cache(lm, ["blocks.15.hook_resid_post"], "cache/", n_tokens=10**6)
for x in activations.CachedActivations("cache/").batches(4096):  # [4096, d] tensors, no model
    ...
```
"""

from .buffer import ShuffleBuffer
from .cache import CachedActivations, write_cache
from .hooks import harvest, logits, patch_site, token_mask
from .model import LanguageModel, cache_dir, default_model_path, load_model, wrap_model
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
    "ShuffleBuffer",
    "StreamPosition",
    "cache_dir",
    "check_site_name",
    "decoder_layers",
    "default_model_path",
    "default_texts",
    "encode_texts",
    "generated_texts",
    "harvest",
    "hf_dataset_texts",
    "iter_token_windows",
    "load_model",
    "logits",
    "parse_site",
    "patch_site",
    "read_text_files",
    "select_split",
    "split_of",
    "stream",
    "token_mask",
    "token_windows",
    "valid_sites",
    "wrap_model",
    "write_cache",
]
