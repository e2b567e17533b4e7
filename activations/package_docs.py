"""Out-of-domain text every install has: the long descriptions (README markdown / reST) in the
METADATA of the installed Python packages. Neither training corpus holds them (the stdlib
docstrings skip site-packages; the self-generated text is the model's own prose), so an SAE's
reconstruction on them measures how far it reaches beyond its training data."""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools

from .text import _txt_documents

_MIN_CHARS = 200


def package_descriptions(max_docs_per_package: int = 2) -> list[str]:
    """The first `max_docs_per_package` documents (~2000-character blocks cut at blank lines)
    of every installed distribution's long description, one distribution per name. The order
    is by each document's sha256, so any prefix mixes many packages. The set depends on what
    is installed (a fresh `pip install -e .` holds the dependencies' descriptions)."""
    seen: set[str] = set()
    docs: list[str] = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        if name in seen or len(body) < _MIN_CHARS:
            continue
        seen.add(name)
        docs.extend(itertools.islice(_txt_documents(body), max_docs_per_package))
    return sorted(docs, key=lambda doc: hashlib.sha256(doc.encode("utf-8", "surrogatepass")).hexdigest())
