"""Compiled documents: KV slots owned by a document, keyed by its content hash.

The key is sha256(model fingerprint, compile recipe, token ids), so a document's KV is
only reused for the same model, recipe and exact tokens. Documents in use are locked;
unlocked ones are evicted least-recently-used when the pool runs short. (`radix_ext`
puts the same entries in SGLang's radix tree, with tiers and persistence.)
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from epic_sglang.kv_pool import SlotAllocator
from epic_sglang.policies import CompileRecipe


def document_key(fingerprint: str, recipe: CompileRecipe, token_ids: tuple[int, ...]) -> str:
    h = hashlib.sha256(f"{fingerprint}|{recipe.name}|".encode())
    h.update(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class CachedDocument:
    key: str
    token_ids: tuple[int, ...]
    slots: torch.Tensor  # (len,) KV slots, position-free (un-rotated keys)
    lock_ref: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)


class DocumentCache:
    def __init__(self, allocator: SlotAllocator):
        self.allocator = allocator
        self.entries: OrderedDict[str, CachedDocument] = OrderedDict()  # LRU order, oldest first
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> CachedDocument | None:
        doc = self.entries.get(key)
        if doc is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return doc

    def insert(self, key: str, token_ids: tuple[int, ...], slots: torch.Tensor) -> CachedDocument:
        if key in self.entries:
            raise KeyError(f"document {key[:12]} is already cached")
        doc = CachedDocument(key, token_ids, slots)
        self.entries[key] = doc
        return doc

    def lock(self, doc: CachedDocument) -> None:
        doc.lock_ref += 1

    def unlock(self, doc: CachedDocument) -> None:
        if doc.lock_ref <= 0:
            raise RuntimeError(f"document {doc.key[:12]} unlocked more often than locked")
        doc.lock_ref -= 1

    def evict(self, num_tokens: int) -> int:
        """Free unlocked documents, oldest first, until `num_tokens` slots are freed."""
        freed = 0
        for key, doc in list(self.entries.items()):
            if freed >= num_tokens:
                break
            if doc.lock_ref:
                continue
            del self.entries[key]
            self.allocator.free(doc.slots)
            freed += len(doc)
            self.evictions += 1
        return freed

    def cached_tokens(self) -> int:
        return sum(len(d) for d in self.entries.values())
