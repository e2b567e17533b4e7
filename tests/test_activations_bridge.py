"""The same site names and patching on a TransformerLens 4 TransformerBridge."""

from __future__ import annotations

import copy

import pytest
import torch

import activations
from activations.sites import KINDS, site_name

tl_bridge = pytest.importorskip("transformer_lens.model_bridge", reason="TransformerLens is the optional 'lens' extra")


@pytest.fixture(params=["tiny-llama", "tiny-gpt2"])
def pair(request, tiny_tokenizer):
    from conftest import make_tiny_lm

    lm = make_tiny_lm(tiny_tokenizer, request.param.removeprefix("tiny-"))
    # Booting changes the HF model in place (eager attention, wrapped modules): give it a copy.
    bridge = tl_bridge.TransformerBridge.boot_transformers(
        "tiny", hf_model=copy.deepcopy(lm.model), tokenizer=tiny_tokenizer, device="cpu"
    )
    return lm, activations.wrap_model(bridge, tiny_tokenizer, name=request.param + "-bridge")


@torch.no_grad()
def test_bridge_sites_equal_transformers_sites(pair, tiny_windows):
    lm, blm = pair
    assert blm.is_bridge and blm.n_layers == lm.n_layers and blm.d_model == lm.d_model
    ids = tiny_windows[:2]
    sites = [site_name(layer, kind) for layer in (0, 2) for kind in KINDS]
    ref, got = activations.harvest(lm, ids, sites), activations.harvest(blm, ids, sites)
    for s in sites:  # the bridge forces eager attention; HF uses sdpa: float-rounding differences only
        torch.testing.assert_close(got[s], ref[s], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(activations.logits(blm, ids), activations.logits(lm, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pair", ["tiny-gpt2"], indirect=True)  # the Llama bridge generates slowly on CPU
@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_bridge_patch_matches_transformers_patch(pair, tiny_windows, use_cache):
    lm, blm = pair
    ids, site = tiny_windows[:2, :6], "blocks.1.hook_resid_post"
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)) * 3
    others = []
    blm.model.hook_dict[site].add_hook(lambda a, hook: others.append(1))  # someone else's hook survives ours
    with activations.patch_site(blm, site, lambda a: a):
        torch.testing.assert_close(activations.logits(blm, ids), activations.logits(lm, ids), rtol=1e-4, atol=1e-4)
    with activations.patch_site(blm, site, lambda a: a + direction):
        steered = blm.model.generate(ids, max_new_tokens=4, do_sample=False, use_past_kv_cache=use_cache,
                                     verbose=False, return_type="tokens")
    with activations.patch_site(lm, site, lambda a: a + direction):
        ref = lm.model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=2,
                                attention_mask=torch.ones_like(ids))
    assert torch.equal(steered, ref)
    n = len(others)
    activations.logits(blm, ids)
    assert len(others) == n + 1
