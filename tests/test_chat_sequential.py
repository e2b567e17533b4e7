"""Chat data and whole-sample (FAST) sequences: the template is applied, samples are never mixed
within a sequence and come in order, the held-out split holds per conversation, exact token counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_lm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import activations
import analysis
import sae
from activations.sequential import sample_rows

# ChatML, as SmolLM2 and Qwen use it (SmolLM2's default system prompt left out).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
N_CONV, WORDS = 60, 6
SITE = "blocks.0.hook_resid_pre"


def chatml_text(messages) -> str:
    """The reference rendering, written out by hand."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@pytest.fixture(scope="module")
def word_chat():
    """A tiny Llama whose word-level vocabulary gives every conversation its own words (role names
    shared), with a ChatML template; at blocks.0.hook_resid_pre an activation is its token's
    embedding row, so every streamed activation names its token and conversation."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(N_CONV * WORDS)]
    vocab = {w: i for i, w in enumerate(special + ["user", "assistant", "system"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.chat_template = CHATML
    convs = []
    for c in range(N_CONV):
        w = words[c * WORDS : (c + 1) * WORDS]
        # Lengths vary (1-3 repeats) so batches need padding and length sorting matters.
        convs.append([
            {"role": "user", "content": " ".join(w[:2])},
            {"role": "assistant", "content": " ".join(w[2:] * (1 + c % 3))},
        ])
    owner = {vocab[w]: c for c in range(N_CONV) for w in words[c * WORDS : (c + 1) * WORDS]}
    return make_tiny_lm(tokenizer, "llama"), convs, owner


def test_chat_tokens_follow_the_template(word_chat, tiny_tokenizer):
    lm, convs, _ = word_chat
    ids = list(activations.chat_token_ids(lm.tokenizer, convs[:5], chunk=2))
    assert ids == [lm.tokenizer.encode(chatml_text(c), add_special_tokens=False) for c in convs[:5]]
    assert ids[0][0] == lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ValueError, match="no chat template"):
        list(activations.chat_token_ids(tiny_tokenizer, convs[:1]))


def test_sample_batches_keep_whole_samples_in_order():
    samples = [list(range(100 * i, 100 * i + 1 + (7 * i) % 11)) for i in range(40)]
    batches = list(activations.sample_batches(samples, max_tokens=8, batch_rows=3, pad_id=-1, pool_batches=2))
    rows = []
    for ids, mask in batches:
        for r, m in zip(ids.tolist(), mask.tolist()):
            n = sum(m)
            assert m == [1] * n + [0] * (len(m) - n) and r[n:] == [-1] * (len(m) - n)
            rows.append(r[:n])
    # Each row is one sample (cut at 8 tokens), each pool of 6 holds the next 6 samples in order.
    for pool in range(0, 40, 6):
        assert sorted(rows[pool : pool + 6]) == sorted(s[:8] for s in samples[pool : pool + 6])
    assert len(rows) == 40


def test_sequential_rows_equal_each_sample_run_alone(tiny_lm):
    tok = tiny_lm.tokenizer
    docs = activations.default_texts(limit=12)
    site = "blocks.3.hook_resid_post"
    got = torch.cat([r[site] for r in sample_rows(tiny_lm, docs, [site], 24, 4, repeat=False, chat=False, split="all")])
    want = []
    for doc in docs:
        ids = torch.tensor([[tok.bos_token_id, *tok.encode(doc, add_special_tokens=False)][:24]])
        acts = activations.harvest(tiny_lm, ids, site)[site][0]
        want.append(acts[activations.token_mask(tiny_lm, ids)[0]])
    want = torch.cat(want)
    assert got.shape == want.shape
    # Rows come length-sorted within a pool: match each to its nearest reference row.
    dist = torch.cdist(got, want, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(dim=1).values.max() < 1e-5 and dist.min(dim=0).values.max() < 1e-5


def test_chat_stream_never_mixes_conversations_and_skips_heldout(word_chat):
    lm, convs, owner = word_chat
    train = list(activations.select_conversations(convs, "train"))
    assert 0 < len(train) < len(convs)
    seen_inputs = []
    handle = lm.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen_inputs.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone())),
        with_kwargs=True,
    )
    templated = {tuple(ids): c for c, ids in enumerate(activations.chat_token_ids(lm.tokenizer, convs))}
    try:
        batches = list(activations.stream(
            lm, SITE, texts=convs, chat=True, sequential=True, context_len=64, batch_size=16, lm_batch_size=4,
            progress=False,
        ))
    finally:
        handle.remove()
    # Every sequence fed to the model is exactly one training conversation, whole, then padding.
    fed = [templated[tuple(row[mask.bool()].tolist())] for ids, masks in seen_inputs for row, mask in zip(ids, masks)]
    assert sorted(fed) == [convs.index(c) for c in train]
    # ... read in order: pools of 8 batches x 4 rows, sorted by length only within a pool.
    order = [convs.index(c) for c in train]
    assert [sorted(fed[i : i + 32]) for i in range(0, len(fed), 32)] == [sorted(order[i : i + 32]) for i in range(0, len(order), 32)]
    # Streamed activations: every train token but each sequence's first, no held-out token.
    emb = lm.model.model.embed_tokens.weight
    rows = torch.cat([b[SITE] for b in batches])
    token_of = torch.cdist(rows, emb, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1).tolist()
    streamed = sorted(token_of)
    want = sorted(t for c in train for t in lm.tokenizer.encode(chatml_text(c), add_special_tokens=False)[1:])
    assert streamed == want
    assert {owner[t] for t in token_of if t in owner} == {convs.index(c) for c in train}


def test_sequential_stream_yields_exactly_n_tokens(word_chat):
    lm, convs, _ = word_chat
    with pytest.warns(UserWarning, match="another pass"):
        batches = list(activations.stream(
            lm, SITE, texts=convs, chat=True, sequential=True, n_tokens=3001, batch_size=64, lm_batch_size=8,
            progress=False,
        ))
    assert sum(len(b[SITE]) for b in batches) == 3001
    packed = activations.stream(lm, SITE, texts=convs, chat=True, n_tokens=500, batch_size=64, context_len=16, progress=False)
    assert sum(len(b[SITE]) for b in packed) == 500


def test_chat_files_and_their_errors(tmp_path, word_chat):
    _, convs, _ = word_chat
    good = tmp_path / "chat.jsonl"
    good.write_text("\n".join(json.dumps({"messages": c, "id": i}) for i, c in enumerate(convs)) + "\n\n")
    assert activations.is_chat_file(good) and list(activations.read_chat_files([good])) == convs
    heldout = list(activations.read_chat_files([good], split="heldout"))
    assert heldout == [c for c in convs if activations.split_of(activations.conversation_key(c)) == "heldout"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "plain"}) + "\n")
    assert not activations.is_chat_file(bad)
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no 'messages' list"):
        list(activations.read_chat_files([bad]))
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        list(activations.read_chat_files([bad]))


def test_chat_eval_reads_heldout_conversations_whole(word_chat):
    lm, convs, owner = word_chat
    model = sae.create(sae.SAEConfig(architecture="topk", d_in=lm.d_model, n_latents=128, k=8))
    report = analysis.evaluate(
        model, lm, "blocks.1.hook_resid_post", texts=convs, chat=True, n_tokens=10**6, context_len=64,
        absorption=False, probing=False, contrastive=False, progress=False,
    )
    heldout = [c for c in convs if activations.split_of(activations.conversation_key(c)) == "heldout"]
    text = report["meta"]["text"]
    lengths = [len(lm.tokenizer.encode(chatml_text(c), add_special_tokens=False)) for c in heldout]
    assert text["chat"] and text["documents_read"] == len(heldout) and text["tokens"] == sum(lengths)
    assert 0 <= report["fvu"] and report["ce_clean"] > 0


def test_builtin_chat_set_shares_the_heldout_split_of_the_corpus():
    convs = activations.default_conversations()
    heldout_docs = set(activations.default_texts(split="heldout"))
    for split in ("train", "heldout"):
        part = activations.default_conversations(split=split)
        answers = [m["content"] for c in part for m in c if m["role"] == "assistant"]
        assert all((a in heldout_docs) == (split == "heldout") for a in answers)
    assert 0.07 < len(activations.default_conversations(split="heldout")) / len(convs) < 0.13
    assert convs[0][-2]["content"].startswith(("What", "Explain", "How", "Describe", "Give", "When"))


@pytest.mark.real_model
def test_smollm_chat_template_and_fast_stream(default_lm):
    conv = [{"role": "user", "content": "What does `json.dumps` do?"},
            {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}]
    (ids,) = activations.chat_token_ids(default_lm.tokenizer, [conv])
    text = default_lm.tokenizer.apply_chat_template(conv, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and ids == default_lm.tokenizer.encode(text, add_special_tokens=False)
    site = "blocks.15.hook_resid_post"
    (short,) = activations.chat_token_ids(default_lm.tokenizer, [conv[:1]])
    rows = torch.cat([r[site] for r in sample_rows(default_lm, [conv, conv[:1]], [site], 256, 2, repeat=False, split="all")])
    assert len(rows) == len(ids) - 1 + len(short) - 1  # both whole, each one's first token masked
    # The attention sink is masked; the template's inner special tokens have ordinary norms.
    assert rows.norm(dim=-1).max() < 1000


def test_cli_trains_fast_on_a_chat_file_and_evals_on_it(tmp_path, word_chat, capsys):
    from sae.app.cli import main

    lm, convs, _ = word_chat
    model_dir, run = tmp_path / "model", tmp_path / "run"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    with pytest.raises(SystemExit, match="add --chat"):
        main(["train", "--model", str(model_dir), "--texts", str(chat_file), "--no-wandb", "--out-dir", str(run)])
    assert main([
        "train", "--model", str(model_dir), "--sites", "blocks.1.hook_resid_post", "--texts", str(chat_file), "--chat",
        "--sequential", "--n-tokens", "384", "--batch-size", "64", "--context-len", "64", "--expansion-factor", "2",
        "--k", "4", "--no-wandb", "--out-dir", str(run), "--log-every", "5",
    ]) == 0
    assert "CE-loss score=" in capsys.readouterr().out  # scored on the file's held-out conversations
    ckpt = run / "blocks.1.hook_resid_post"
    assert sae.load(ckpt).metadata["chat"] == "true" and sae.load(ckpt).metadata["sequential"] == "true"
    assert main([
        "eval", str(ckpt), "--texts", str(chat_file), "--no-absorption", "--no-probing", "--no-contrastive",
        "--wandb-mode", "disabled", "--out", str(tmp_path / "eval"), "--context-len", "64",
    ]) == 0
    text = json.loads((tmp_path / "eval" / "run/blocks.1.hook_resid_post" / "report.json").read_text())["meta"]["text"]
    n_heldout = sum(activations.split_of(activations.conversation_key(c)) == "heldout" for c in convs)
    assert text["chat"] and text["source"] == "given conversations" and text["documents_read"] == n_heldout
