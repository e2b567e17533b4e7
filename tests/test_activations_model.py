"""Model loading: the default model's converted copy is cached atomically; wrapping checks types."""

from __future__ import annotations

import pytest
import torch
import transformers

import activations
from activations import model as model_mod


def test_default_conversion_is_atomic_and_cached(tmp_path, monkeypatch, tiny_lm):
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path))
    # Stand in for the 40 s GGUF load with the tiny model; the conversion logic is what is tested.
    monkeypatch.setattr(model_mod, "default_gguf_path", lambda: tmp_path / "fake" / "model.gguf")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_lm.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_lm.model)
    real_save = type(tiny_lm.model).save_pretrained

    def dies_midway(self, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_lm.model), "save_pretrained", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        activations.default_model_path()
    assert list(tmp_path.iterdir()) == []  # no half-written copy left behind

    monkeypatch.setattr(type(tiny_lm.model), "save_pretrained", real_save)
    path = activations.default_model_path()
    assert path.parent == tmp_path and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    monkeypatch.undo()  # reload through the real transformers loaders
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path))
    lm = activations.load_model()
    assert lm.name == "SmolLM2-135M-Instruct" and lm.n_layers == tiny_lm.n_layers
    ids = torch.tensor([[1, 40, 41, 42]])
    torch.testing.assert_close(activations.logits(lm, ids), activations.logits(tiny_lm, ids), rtol=0, atol=0)


def test_wrap_model_rejects_other_objects(tiny_tokenizer):
    with pytest.raises(TypeError, match="TransformerBridge"):
        activations.wrap_model(torch.nn.Linear(2, 2), tiny_tokenizer)
