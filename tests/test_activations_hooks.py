"""Hook sites: harvested values against independent references, early stopping, patching."""

from __future__ import annotations

import pytest
import torch

import activations
from activations.sites import KINDS, site_name

# Independent module paths per family (written out here, not taken from activations.sites).
_PATHS = {
    "tiny-llama": ("model.layers.{}", "model.layers.{}.self_attn", "model.layers.{}.mlp", "model.norm"),
    "tiny-qwen2": ("model.layers.{}", "model.layers.{}.self_attn", "model.layers.{}.mlp", "model.norm"),
    "tiny-gpt2": ("transformer.h.{}", "transformer.h.{}.attn", "transformer.h.{}.mlp", "transformer.ln_f"),
    "tiny-neox": ("gpt_neox.layers.{}", "gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp", "gpt_neox.final_layer_norm"),
}


def _all_sites(lm):
    return [site_name(layer, kind) for layer in range(lm.n_layers) for kind in KINDS]


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@torch.no_grad()
def test_resid_sites_equal_hidden_states(tiny_family_lm, tiny_windows):
    lm, ids = tiny_family_lm, tiny_windows[:3]
    hs = lm.model(ids, output_hidden_states=True).hidden_states
    acts = activations.harvest(lm, ids, _all_sites(lm))
    last = lm.n_layers - 1
    for layer in range(lm.n_layers):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_pre"], hs[layer], rtol=0, atol=0)
        if layer < last:
            torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hs[layer + 1], rtol=0, atol=0)
    # hidden_states[-1] is after the final norm: the raw last resid_post must map onto it through that norm.
    final_norm = lm.model.get_submodule(_PATHS[lm.name][3])
    torch.testing.assert_close(final_norm(acts[f"blocks.{last}.hook_resid_post"]), hs[-1])
    assert not torch.allclose(acts[f"blocks.{last}.hook_resid_post"], hs[-1])


@torch.no_grad()
def test_module_outputs_match_independent_hooks(tiny_family_lm, tiny_windows):
    lm, ids = tiny_family_lm, tiny_windows[:2]
    seen = {}
    handles = []
    layer_path, attn_path, mlp_path, _ = _PATHS[lm.name]
    for layer in range(lm.n_layers):
        for kind, path in (("attn_out", attn_path), ("mlp_out", mlp_path)):
            mod = lm.model.get_submodule(path.format(layer))
            key = f"blocks.{layer}.hook_{kind}"
            handles.append(mod.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(key, _first(o))))
    lm.model(ids)
    for h in handles:
        h.remove()
    acts = activations.harvest(lm, ids, _all_sites(lm))
    for key, ref in seen.items():
        torch.testing.assert_close(acts[key], ref, rtol=0, atol=0)
    # Residual bookkeeping holds in every family (sequential or parallel residual).
    for layer in range(lm.n_layers):
        b = f"blocks.{layer}.hook_"
        torch.testing.assert_close(acts[b + "resid_post"], acts[b + "resid_pre"] + acts[b + "attn_out"] + acts[b + "mlp_out"])
        # mlp.hook_in is what the MLP reads: running the MLP on it gives mlp_out.
        mlp = lm.model.get_submodule(mlp_path.format(layer))
        torch.testing.assert_close(mlp(acts[f"blocks.{layer}.mlp.hook_in"]), acts[b + "mlp_out"], rtol=0, atol=0)


@torch.no_grad()
def test_early_stop_skips_later_layers_and_keeps_values(tiny_lm, tiny_windows):
    lm, ids = tiny_lm, tiny_windows[:2]
    site = "blocks.1.hook_mlp_out"
    full = {}
    h = lm.model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: full.__setitem__("x", o))
    full["resid_pre2"] = lm.model(ids, output_hidden_states=True).hidden_states[2]
    h.remove()
    n_before = _n_hooks(lm.model)  # transformers installs its own output-recording hooks
    fired = []
    later = [lm.model.model.layers[2], lm.model.model.layers[3], lm.model.model.norm, lm.model.lm_head]
    hooks = [m.register_forward_hook(lambda m, a, o: fired.append(type(m).__name__)) for m in later]
    try:
        acts = activations.harvest(lm, ids, [site, "blocks.0.hook_resid_post"])
    finally:
        for h in hooks:
            h.remove()
    assert fired == []
    torch.testing.assert_close(acts[site], full["x"], rtol=0, atol=0)
    assert set(acts) == {site, "blocks.0.hook_resid_post"}
    # The interrupted forward leaves no hook behind and the model runs normally afterwards.
    assert _n_hooks(lm.model) == n_before
    torch.testing.assert_close(lm.model(ids, output_hidden_states=True).hidden_states[2], full["resid_pre2"])


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_many_sites_one_pass_equal_single_site_passes(tiny_lm, tiny_windows):
    ids = tiny_windows[:2]
    sites = ["blocks.3.hook_resid_post", "blocks.0.hook_attn_out", "blocks.2.hook_resid_pre"]
    together = activations.harvest(tiny_lm, ids, sites)
    assert list(together) == sites
    for s in sites:
        torch.testing.assert_close(together[s], activations.harvest(tiny_lm, ids, s)[s], rtol=0, atol=0)


def test_token_mask_excludes_bos_pad_and_specials(tiny_lm):
    tok = tiny_lm.tokenizer
    body = tok("def f(x): return x", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id, *body, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]])
    keep = activations.token_mask(tiny_lm, ids)
    assert keep.tolist() == [[False] + [True] * len(body) + [False, False, False]]
    mask = torch.ones_like(ids)
    mask[0, 1] = 0  # positions the attention mask hides are dropped too
    assert activations.token_mask(tiny_lm, ids, mask)[0, 1:3].tolist() == [False, True]


def test_unknown_site_lists_valid_sites(tiny_lm, tiny_windows):
    for bad in ["blocks.9.hook_resid_post", "blocks.0.hook_resid_mid", "resid_post"]:
        with pytest.raises(ValueError) as err:
            activations.harvest(tiny_lm, tiny_windows[:1], [bad])
        message = str(err.value)
        assert bad in message and "valid: blocks.{0..3}.{hook_resid_pre,hook_resid_post,hook_attn_out,hook_mlp_out,mlp.hook_in}" in message
        assert len(message) < 200, "the valid sites are listed compactly, not one by one"
    assert len(activations.valid_sites(tiny_lm)) == len(KINDS) * tiny_lm.n_layers


def test_bad_input_ids_error(tiny_lm):
    with pytest.raises(ValueError, match="tokenise"):
        activations.harvest(tiny_lm, torch.zeros(4, 3), "blocks.0.hook_resid_post")


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_patch_changes_logits_and_identity_does_not(tiny_family_lm, tiny_windows, kind):
    lm, ids = tiny_family_lm, tiny_windows[:2]
    site = site_name(1, kind)
    base = activations.logits(lm, ids)
    with activations.patch_site(lm, site, lambda a: a):
        torch.testing.assert_close(activations.logits(lm, ids), base, rtol=0, atol=0)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))  # not a constant: LayerNorm ignores those
    with activations.patch_site(lm, site, lambda a: a + 3 * direction):
        changed = activations.logits(lm, ids)
    assert (changed - base).abs().max() > 1e-3
    torch.testing.assert_close(activations.logits(lm, ids), base, rtol=0, atol=0)  # hook removed
    # The patched value is what the site and the layers after it see.
    with activations.patch_site(lm, site, torch.zeros_like):
        zeroed = activations.harvest(lm, ids, [site, "blocks.2.hook_resid_pre"])
    assert zeroed[site].abs().max() == 0
    if kind == "resid_post":
        assert zeroed["blocks.2.hook_resid_pre"].abs().max() == 0


@torch.no_grad()
def _greedy_reference(lm, prompt, n_new, fn, site):
    ids = prompt
    with activations.patch_site(lm, site, fn):
        for _ in range(n_new):
            nxt = activations.logits(lm, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_patch_acts_during_generate(tiny_lm, tiny_windows, use_cache):
    lm, prompt = tiny_lm, tiny_windows[:2, :6]
    site = "blocks.2.hook_resid_post"
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1)) * 4
    lengths = []

    def steer(a):
        lengths.append(a.shape[1])
        return a + direction

    gen_kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=2, attention_mask=torch.ones_like(prompt))
    plain = lm.model.generate(prompt, **gen_kwargs)
    with activations.patch_site(lm, site, steer):
        steered = lm.model.generate(prompt, **gen_kwargs)
    assert lengths[0] == prompt.shape[1] and len(lengths) == 5
    assert lengths[1:] == ([1] * 4 if use_cache else [7, 8, 9, 10])
    assert not torch.equal(plain, steered)
    torch.testing.assert_close(steered, _greedy_reference(lm, prompt, 5, lambda a: a + direction, site))


def test_harvest_accepts_text(tiny_lm):
    site = "blocks.1.hook_resid_post"
    texts = ["A short one.", "A somewhat longer second text, padded to match."]
    ids, mask = activations.encode_texts(tiny_lm.tokenizer, texts)
    assert ids[:, 0].eq(tiny_lm.tokenizer.bos_token_id).all() and mask[0].sum() < mask[1].sum()
    got = activations.harvest(tiny_lm, texts, site)[site]
    want = activations.harvest(tiny_lm, ids, site, attention_mask=mask)[site]
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep])
    alone = activations.harvest(tiny_lm, texts[0], site)[site]  # one string: a batch of one, no padding
    torch.testing.assert_close(alone[0], got[0, : alone.shape[1]], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="list of strings"):
        activations.harvest(tiny_lm, [], site)
