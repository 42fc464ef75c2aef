"""Document keys: what makes two compiled documents interchangeable.

DocKey = sha256(model fingerprint, compile recipe, namespace, token ids). The same text
compiled for another model, recipe (e.g. legolink0's sinks) or tenant gets another key,
so its KV is never linked across them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DOC_EXTRA_KEY_PREFIX = "epic-doc:"


def document_key(fingerprint: str, recipe: str, namespace: str | None, token_ids: Sequence[int]) -> str:
    h = hashlib.sha256(f"{fingerprint}|{recipe}|{namespace or ''}|".encode())
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def doc_extra_key(key: str) -> str:
    """The RadixKey namespace of a document node: unique per document, so a document is a
    single node that exact-prefix lookups (extra_key = tenant namespace) never reach."""
    return DOC_EXTRA_KEY_PREFIX + key


def key_of_extra(extra_key: str | None) -> str | None:
    """The DocKey of a node's extra_key, or None for an ordinary prefix node."""
    if extra_key and extra_key.startswith(DOC_EXTRA_KEY_PREFIX):
        return extra_key[len(DOC_EXTRA_KEY_PREFIX):]
    return None
