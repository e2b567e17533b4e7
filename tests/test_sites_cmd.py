"""`sae sites [MODEL]`: a model's hook sites, one line per kind, or every name with --names."""
import pytest

import activations
from sae.app.cli import main


def test_sites_of_a_local_model(tmp_path, tiny_lm, capsys):
    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    assert main(["sites", str(model_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith(": 4 layers, d_model 64")
    assert [line.split()[:2] for line in lines[1:]] == [
        ["blocks.{0..3}.hook_resid_pre", "input"], ["blocks.{0..3}.hook_resid_post", "output"],
        ["blocks.{0..3}.hook_attn_out", "output"], ["blocks.{0..3}.hook_mlp_out", "output"],
        ["blocks.{0..3}.mlp.hook_in", "input"],
    ]
    assert lines[3].endswith("model.layers.{L}.self_attn") and lines[4].endswith("model.layers.{L}.mlp")
    assert lines[5].endswith("input of model.layers.{L}.mlp")

    assert main(["sites", str(model_dir), "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 20 and names == activations.valid_sites(tiny_lm)
    # Every listed name is one the harvester accepts and captures.
    ids = tiny_lm.tokenizer("def f(x): return x", return_tensors="pt").input_ids
    acts = activations.harvest(tiny_lm, ids, names)
    assert sorted(acts) == sorted(names) and all(a.shape[-1] == 64 for a in acts.values())


def test_sites_of_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot load model"):
        main(["sites", str(tmp_path / "nowhere")])
