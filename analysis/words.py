"""Single-token words from the tokenizer's own vocabulary (no word list to download), and the
prompts that put them in context, for the first-letter absorption task."""

from __future__ import annotations

import random
import re
from typing import Any

import torch
from torch import Tensor

# Few-shot spelling context (Chanin et al. use an in-context "word: letter" list); the residual
# is read at the word token, so only the tokens before it matter.
ICL_PREFIX = "Say the first letter of each word.\n tree: T\n house: H\n ocean: O\n garden: G\n"


def single_token_words(
    tokenizer: Any, min_len: int = 3, max_words: int | None = None, seed: int = 0
) -> list[tuple[str, int]]:
    """(word, token id) for vocabulary entries that decode to ' word': a leading space and
    lowercase ASCII letters only. Some are word-start fragments; their first letter is still
    well defined, which is all the task needs. A seeded random subset if max_words is set."""
    pattern = re.compile(rf" [a-z]{{{min_len},}}")
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    words = [(s[1:], i) for i, s in enumerate(vocab) if pattern.fullmatch(s)]
    if not words:
        raise ValueError(
            f"The tokenizer has no single-token lowercase words of {min_len}+ letters with a leading space; "
            "the first-letter absorption task needs a BPE tokenizer with word tokens (e.g. GPT-2 / Llama style)."
        )
    if max_words is not None and len(words) > max_words:
        words = sorted(random.Random(seed).sample(words, max_words), key=lambda w: w[1])
    return words


def word_prompts(tokenizer: Any, token_ids: list[int]) -> Tensor:
    """LongTensor [n_words, T]: BOS (if the tokenizer has one) + ICL prefix + the word token last.

    Built from ids so every prompt has the same length and the word stays one token.
    """
    prefix = tokenizer.encode(ICL_PREFIX, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id, *prefix]
    ids = torch.tensor(prefix, dtype=torch.long).repeat(len(token_ids), 1)
    return torch.cat([ids, torch.tensor(token_ids, dtype=torch.long)[:, None]], dim=1)
