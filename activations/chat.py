"""Chat data for instruct models: conversations (lists of {role, content} messages) read from
JSONL files or built offline from the stdlib docstrings, their train / held-out split, and
their tokens under the model's chat template."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from .text import _MIN_DOC_CHARS, HELDOUT_FRACTION, Split, _stdlib_files, check_split, split_of

Conversation = list[dict[str, str]]

# Questions of the built-in set, by the kind of object a docstring documents; one is picked per
# object by a hash of its name, so the set is the same on every machine.
_QUESTIONS = {
    "module": ("What is the `{}` module for?", "Give me an overview of the `{}` module.", "When would I use `{}`?"),
    "class": ("What is `{}`?", "Describe the class `{}`.", "What is the `{}` class used for?"),
    "function": ("What does `{}` do?", "Explain `{}`.", "How does `{}` work?", "What is `{}` for?"),
}
# None keeps the template's own default system prompt (SmolLM2 inserts one).
_SYSTEM_PROMPTS = (
    None,
    "You are an expert on the Python standard library. Answer from its documentation.",
    "You are a concise assistant for Python programmers.",
    "You are a helpful assistant.",
    "Answer questions about Python modules, classes and functions.",
    "You help developers read the Python documentation.",
)
_MAX_TURNS = 3
_BUILTIN_ORDER_SEED = 0


def conversation_key(messages: Conversation) -> str:
    """The text a conversation's split is hashed from: its messages as canonical JSON (roles and
    contents only), so the split does not depend on the model's template."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def select_conversations(
    conversations: Iterable[Conversation], split: Split = "train", heldout_fraction: float = HELDOUT_FRACTION
) -> Iterator[Conversation]:
    """The conversations of `split` ("train", "heldout" or "all"), lazily, by `split_of` of their key."""
    check_split(split, heldout_fraction)
    for conv in conversations:
        if split == "all" or split_of(conversation_key(conv), heldout_fraction) == split:
            yield conv


def check_conversation(messages: Any, where: str) -> Conversation:
    """`messages` as a conversation, or a one-line error naming `where` and the expected form."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: every message needs string 'role' and 'content' fields, got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_chat_files(
    paths: Iterable[str | os.PathLike], split: Split = "all", heldout_fraction: float = HELDOUT_FRACTION
) -> Iterator[Conversation]:
    """Conversations from JSONL files, one per line as {"messages": [{"role", "content"}, ...]},
    in file order; `split` keeps one part (see `select_conversations`)."""
    yield from select_conversations(_read_chat_files(paths), split, heldout_fraction)


def _read_chat_files(paths: Iterable[str | os.PathLike]) -> Iterator[Conversation]:
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"Chat file {path} does not exist; pass existing .jsonl files.")
        if path.suffix != ".jsonl":
            raise ValueError(f"Chat file {path} must be JSONL (one {{\"messages\": [...]}} per line), not {path.suffix!r}")
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not valid JSON ({err.msg})") from err
                if not isinstance(record, dict) or "messages" not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{n} has no 'messages' list (got {keys}); chat files hold one conversation a line")
                yield check_conversation(record["messages"], f"{path}:{n}")


def is_chat_file(path: str | os.PathLike) -> bool:
    """Whether a file is chat JSONL: a .jsonl whose first record has a 'messages' field."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "messages" in record
    return False


def _pick(options: tuple, key: str) -> Any:
    return options[hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[0] % len(options)]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _documented_objects(path: Path, root: Path) -> Iterator[tuple[str, str, str]]:
    """(kind, qualified name, docstring) for each documented module, class and function of a file,
    with the same docstrings as `iter_default_texts`."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return
    yield from _documented_in(tree, _module_name(path, root))


_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _documented_in(node: ast.AST, name: str) -> Iterator[tuple[str, str, str]]:
    if isinstance(node, _SCOPES):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= _MIN_DOC_CHARS:
            kind = "module" if isinstance(node, ast.Module) else "class" if isinstance(node, ast.ClassDef) else "function"
            yield kind, name, doc
    # Only statements can hold a def or class: expressions are skipped (most of the tree).
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _documented_in(child, f"{name}.{child.name}")
        elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _documented_in(child, name)


def _rotated(options: tuple, key: str) -> tuple:
    i = _pick(range(len(options)), key)
    return options[i:] + options[:i]


def _agreeing_conversation(group: list[tuple[str, str, str]], split: str) -> Conversation | None:
    """A conversation asking about each (kind, name, docstring) of `group` in turn, its wording (system
    prompt, first question) picked so that its own split (`conversation_key`) is `split`, the split
    of its docstrings: then neither this set nor the plain corpus leaks the other's held-out text.
    None when no wording agrees (~15% of held-out single-turn groups)."""
    first_kind, first_name, _ = group[0]
    later = []
    for kind, name, doc in group[1:]:
        later += [{"role": "user", "content": _pick(_QUESTIONS[kind], name).format(name)}, {"role": "assistant", "content": doc}]
    for system, question in itertools.product(
        _rotated(_SYSTEM_PROMPTS, first_name + "/system"), _rotated(_QUESTIONS[first_kind], first_name)
    ):
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages += [{"role": "user", "content": question.format(first_name)}, {"role": "assistant", "content": group[0][2]}]
        messages += later
        if split_of(conversation_key(messages)) == split:
            return messages
    return None


@lru_cache(maxsize=1)
def _builtin_conversations() -> tuple[tuple[tuple[str, str], ...], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    conversations = []
    for path in _stdlib_files():
        by_split: dict[str, list[tuple[str, str, str]]] = {"train": [], "heldout": []}
        for item in _documented_objects(path, root):
            by_split[split_of(item[2])].append(item)
        for split, items in by_split.items():
            start = 0
            while start < len(items):
                turns = 1 + _pick(range(_MAX_TURNS), items[start][1])
                group, start = items[start : start + turns], start + turns
                messages = _agreeing_conversation(group, split)
                if messages is not None:
                    conversations.append(tuple((m["role"], m["content"]) for m in messages))
    # A fixed shuffle, as a downloaded SFT set comes: a sequential read then spans every module.
    random.Random(_BUILTIN_ORDER_SEED).shuffle(conversations)
    return tuple(conversations)


def default_conversations(
    limit: int | None = None, split: Split = "all", heldout_fraction: float = HELDOUT_FRACTION
) -> list[Conversation]:
    """The built-in offline chat set: questions about stdlib objects ("What does `json.dumps` do?")
    answered by their docstrings, 1-3 turns from one module, some with a system prompt (~4.7k
    conversations, in a fixed shuffled order). A conversation's held-out split (`conversation_key`)
    equals its docstrings' split in `default_texts`, so the two corpora share one held-out set."""
    if heldout_fraction != HELDOUT_FRACTION:
        raise ValueError(f"the built-in chat set is split at the default held-out fraction {HELDOUT_FRACTION}")
    conversations = ([{"role": r, "content": c} for r, c in conv] for conv in _builtin_conversations())
    return list(itertools.islice(select_conversations(conversations, split, heldout_fraction), limit))


def check_chat_template(tokenizer: Any, model_name: str = "the model") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_name}'s tokenizer has no chat template; train on plain text (drop --chat) or use an instruct model")


def chat_token_ids(tokenizer: Any, conversations: Iterable[Conversation], chunk: int = 64) -> Iterator[list[int]]:
    """Each conversation's token ids under the tokenizer's chat template, in order (no generation
    prompt: the samples are complete)."""
    check_chat_template(tokenizer)
    conversations = iter(conversations)
    while batch := list(itertools.islice(conversations, chunk)):
        out = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True)
        yield from (list(ids) for ids in out["input_ids"])
