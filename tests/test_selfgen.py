"""Self-generated text (FaithfulSAE): the cached corpus, named text sources, window-level mixes,
and the out-of-domain package descriptions."""
import hashlib
import json
import re

import pytest

import activations
from activations import selfgen
from sae.app.cli import main
from sae.app.data import text_source

SMALL = activations.Sampling(max_new_tokens=12, batch_size=3)


def _corpus(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_generation_is_deterministic_for_a_seed(tiny_lm, tmp_path):
    a = activations.generate_corpus(tiny_lm, 40, tmp_path / "a.jsonl", seed=3, sampling=SMALL, progress=False)
    b = activations.generate_corpus(tiny_lm, 40, tmp_path / "b.jsonl", seed=3, sampling=SMALL, progress=False)
    c = activations.generate_corpus(tiny_lm, 40, tmp_path / "c.jsonl", seed=4, sampling=SMALL, progress=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    manifest = activations.read_manifest(a)
    docs = _corpus(a)
    counted = sum(len(tiny_lm.tokenizer.encode(d, add_special_tokens=False)) for d in docs)
    assert manifest["n_tokens"] == counted >= 40 and manifest["n_documents"] == len(docs)
    # It stops at the first document reaching the request: without the last one it falls short.
    assert counted - len(tiny_lm.tokenizer.encode(docs[-1], add_special_tokens=False)) < 40
    assert manifest["seed"] == 3 and manifest["model"] == tiny_lm.name and manifest["max_new_tokens"] == 12
    assert manifest["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()


def test_a_matching_corpus_is_reused_and_any_other_regenerated(tiny_lm, tmp_path, monkeypatch):
    path = activations.generate_corpus(tiny_lm, 30, tmp_path / "c.jsonl", seed=1, sampling=SMALL, progress=False)
    first = path.read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("sampled again although the cached corpus matches")

    with monkeypatch.context() as m:
        m.setattr(selfgen, "generated_texts", fail)
        assert activations.generate_corpus(tiny_lm, 30, path, seed=1, sampling=SMALL, progress=False) == path
    assert path.read_bytes() == first
    path.write_bytes(first + b'{"text": "edited"}\n')  # altered: the manifest's checksum no longer matches
    assert activations.read_manifest(path) is None
    activations.generate_corpus(tiny_lm, 30, path, seed=1, sampling=SMALL, progress=False)
    assert path.read_bytes() == first
    activations.generate_corpus(tiny_lm, 30, path, seed=2, sampling=SMALL, progress=False)  # another request
    assert path.read_bytes() != first and activations.read_manifest(path)["seed"] == 2


def test_a_crash_while_generating_leaves_the_previous_corpus_whole(tiny_lm, tmp_path, monkeypatch):
    path = activations.generate_corpus(tiny_lm, 30, tmp_path / "c.jsonl", seed=1, sampling=SMALL, progress=False)
    before = (path.read_bytes(), selfgen.manifest_path(path).read_bytes())

    def crashing(*args, **kwargs):
        yield "one document"
        raise KeyboardInterrupt

    monkeypatch.setattr(selfgen, "generated_texts", crashing)
    with pytest.raises(KeyboardInterrupt):
        activations.generate_corpus(tiny_lm, 30, path, seed=9, sampling=SMALL, progress=False)
    assert (path.read_bytes(), selfgen.manifest_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "c.jsonl.manifest.json"]  # no temp files


def test_parse_mix():
    assert activations.parse_mix(["a.jsonl", "docstrings"]) is None
    assert activations.parse_mix(["docstrings:1", "selfgen:3"]) == {"docstrings": 0.25, "selfgen": 0.75}
    assert activations.parse_mix(["dir:with/colon.txt"]) is None  # no number after the colon: a path
    with pytest.raises(ValueError, match="missing"):
        activations.parse_mix(["docstrings:1", "selfgen"])
    with pytest.raises(ValueError, match="positive"):
        activations.parse_mix(["docstrings:0", "selfgen:1"])


def _tagged_docs(tag: str, n: int) -> list[str]:
    return [f"{tag} record {i:03d}. " + f"The {tag} text goes on. " * 3 for i in range(n)]


def test_mix_takes_windows_in_proportion_from_train_documents_only(tiny_tokenizer):
    sources = {"alpha": _tagged_docs("alpha", 300), "beta": _tagged_docs("beta", 300)}
    weights = {"alpha": 0.3, "beta": 0.7}
    windows = activations.mixed_windows(tiny_tokenizer, sources, weights, 200, 32, seed=0)
    assert windows.shape == (200, 32)
    texts = tiny_tokenizer.batch_decode(windows[:, 1:])
    origin = ["alpha" if "alpha" in t else "beta" for t in texts]
    assert all(("alpha" in t) != ("beta" in t) for t in texts)  # one source per window
    assert origin.count("alpha") == 60 and origin.count("beta") == 140
    assert origin[:60] != ["alpha"] * 60  # shuffled together, not one block after the other
    heldout = {re.match(r"\w+ record \d+", d).group() for docs in sources.values() for d in docs
               if activations.split_of(d) == "heldout"}
    seen = {m for t in texts for m in re.findall(r"\w+ record \d{3}", t)}
    assert heldout and seen and not heldout & seen
    again = activations.mixed_windows(tiny_tokenizer, sources, weights, 200, 32, seed=0)
    assert windows.equal(again)


def test_a_small_source_is_repeated_to_fill_its_share(tiny_tokenizer):
    sources = {"small": _tagged_docs("small", 12), "big": _tagged_docs("big", 300)}
    with pytest.warns(UserWarning, match="repeating"):
        windows = activations.mixed_windows(tiny_tokenizer, sources, {"small": 0.5, "big": 0.5}, 100, 32)
    texts = tiny_tokenizer.batch_decode(windows[:, 1:])
    assert sum("small" in t for t in texts) == 50


def test_train_texts_resolve_names_files_and_mixes(tiny_lm, tmp_path):
    files = {}
    for tag in ("alpha", "beta"):
        files[tag] = tmp_path / f"{tag}.jsonl"
        files[tag].write_text("".join(json.dumps({"text": d}) + "\n" for d in _tagged_docs(tag, 200)))
    docs, source, mix = text_source(tiny_lm, [str(files["beta"])], 32, 1000, 0)
    assert docs == source == _tagged_docs("beta", 200) and mix is None
    docs, windows, mix = text_source(tiny_lm, [f"{files['alpha']}:1", f"{files['beta']}:3"], 32, 1000, 0)
    assert mix == {str(files["alpha"]): 0.25, str(files["beta"]): 0.75} and windows.shape[1] == 32
    assert windows.shape[0] * 31 >= 1000  # enough windows for the run's tokens
    assert [d.split()[0] for d in docs[:4]] == ["alpha", "beta", "alpha", "beta"]  # the evaluator sees both
    with pytest.raises(FileNotFoundError, match="neither a file nor one of"):
        text_source(tiny_lm, ["no-such-source:1", f"{files['beta']}:1"], 32, 1000, 0)
    assert activations.named_texts("docstrings") == activations.default_texts()
    assert activations.named_texts("packages") == activations.package_descriptions()


def test_package_descriptions_are_outside_both_corpora():
    docs = activations.package_descriptions(max_docs_per_package=1)
    assert len(docs) >= 10 and docs == activations.package_descriptions(max_docs_per_package=1)
    assert len(activations.package_descriptions(max_docs_per_package=2)) > len(docs)
    assert not set(docs) & set(activations.default_texts())


def test_generate_command_writes_a_reusable_corpus(tiny_lm, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", str(model_dir), "--tokens", "20", "--out", str(out), "--seed", "7",
            "--max-new-tokens", "10", "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    assert "tokens (seed 7)" in capsys.readouterr().out
    manifest = activations.read_manifest(out)
    assert manifest["seed"] == 7 and manifest["n_tokens"] >= 20
    with pytest.raises(SystemExit, match="error: --out must name a .jsonl file"):
        main([*argv[:-6], "--out", str(tmp_path / "gen.txt")])


@pytest.mark.real_model
def test_default_model_generates_and_the_shipped_corpus_is_its_own(default_lm, tmp_path):
    sampling = activations.Sampling(max_new_tokens=48, batch_size=4)
    path = activations.generate_corpus(default_lm, 150, tmp_path / "g.jsonl", seed=0, sampling=sampling, progress=False)
    docs = _corpus(path)
    assert activations.read_manifest(path)["n_tokens"] >= 150
    # English prose, not noise: most of the characters are letters and spaces.
    text = "".join(docs)
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text)
    shipped = activations.read_manifest(activations.SELFGEN_CORPUS)
    assert shipped is not None and shipped["model"] == default_lm.name  # complete, unaltered, from this model
    assert shipped["temperature"] == 1.0 and shipped["top_p"] == 1.0
    corpus = activations.named_texts("selfgen")
    assert len(corpus) == shipped["n_documents"]
    heldout = [d for d in corpus if activations.split_of(d) == "heldout"]
    assert 0.04 < len(heldout) / len(corpus) < 0.2
