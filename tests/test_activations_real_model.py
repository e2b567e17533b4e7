"""The embedded default model: loads offline and its harvested sites match transformers."""

from __future__ import annotations

import pytest
import torch

import activations

pytestmark = pytest.mark.real_model


@torch.no_grad()
def test_default_model_sites_match_hidden_states(default_lm):
    lm = default_lm
    assert (lm.name, lm.n_layers, lm.d_model) == ("SmolLM2-135M-Instruct", 30, 576)
    tok = lm.tokenizer
    assert (tok.bos_token, tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == ("<|im_start|>", 1, 2, 2)
    ids = activations.token_windows(tok, activations.default_texts(limit=8), 24)[:1]  # CPU: keep it to one forward's worth
    hs = lm.model(ids, output_hidden_states=True).hidden_states
    sites = ["blocks.15.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.29.hook_resid_post"]
    acts = activations.harvest(lm, ids, sites)
    torch.testing.assert_close(acts["blocks.15.hook_resid_post"], hs[16], rtol=0, atol=0)
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hs[0], rtol=0, atol=0)
    torch.testing.assert_close(lm.model.model.norm(acts["blocks.29.hook_resid_post"]), hs[30])
    keep = activations.token_mask(lm, ids)
    assert not keep[:, 0].any() and keep[:, 1:].float().mean() > 0.8
    # BOS really is an outlier here: the reason it is dropped by default.
    norms = acts["blocks.15.hook_resid_post"].norm(dim=-1)
    assert norms[:, 0].min() > 3 * norms[:, 1:].median()
