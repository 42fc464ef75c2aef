"""`PICRadixCache`: SGLang's `RadixCache` whose tree also holds position-independent
document nodes.

- Exact prefixes (system prompts, chat history) are ordinary radix nodes under the
  request's tenant namespace (SGLang's `extra_key`), matched and published as SGLang does.
- A compiled document is one node directly under the root whose `extra_key` is
  "epic-doc:<DocKey>" (see `doc_key.py`): a lookup is an exact match on that key, and a
  prefix lookup can never reach it, so linked (approximate) KV and exact prefixes never mix.
- A request may bring its own KV row: inside a SGLang server the plugin attaches
  `req.epic_link` (`epic_sglang/sglang_plugin/link_request.py`), and match and release
  defer to it (a document compile, or a LegoLink row of prefix + documents).
- Both kinds share SGLang's lock references and eviction policy (LRU by default). An
  evicted document is demoted to the host tier; every compiled document is written through
  to the disk tier when one is configured; a device miss is served from host, then disk,
  before the caller compiles.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from radix_ext.doc_key import doc_extra_key, key_of_extra
from radix_ext.tiers import DiskTier, HostTier, KVLayout, gather_kv, scatter_kv


@dataclass
class CacheCounters:
    device_hits: int = 0  # document lookups served from the device pool
    host_hits: int = 0  # ... reloaded from host memory
    disk_hits: int = 0  # ... reloaded from disk
    misses: int = 0  # lookups the caller had to compile
    evicted_documents: int = 0  # documents evicted from the device pool
    evicted_prefix_tokens: int = 0
    reused_document_tokens: int = 0  # tokens of documents handed out on hits
    prefix_hit_tokens: int = 0  # tokens matched in the exact-prefix tree


class PICRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams, kv_pool, layout: KVLayout, fingerprint: str,
                 host_cache_bytes: int = 0, disk_dir: str | Path | None = None):
        """`kv_pool`: the pool behind `params.token_to_kv_pool_allocator` (`k_buffer` and
        `v_buffer` per layer, as SGLang's `MHATokenToKVPool`); read to demote and persist."""
        super().__init__(params)
        self.kv_pool = kv_pool
        self.layout = layout
        self.fingerprint = fingerprint
        self.host = HostTier(host_cache_bytes) if host_cache_bytes > 0 else None
        self.disk = DiskTier(disk_dir, fingerprint, layout) if disk_dir is not None else None
        self.counters = CacheCounters()
        self._demote_on_evict = True

    # ----------------------------------------------------------------- slots
    def alloc_slots(self, need: int) -> torch.Tensor | None:
        """`need` free slots, evicting unlocked nodes if the pool is short; None if even that fails."""
        allocator = self.token_to_kv_pool_allocator
        slots = allocator.alloc(need)
        if slots is None:
            self.evict(EvictParams(num_tokens=need - allocator.available_size()))
            slots = allocator.alloc(need)
        return slots

    # ----------------------------------------------------------------- SGLang's request hooks
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        link = getattr(params.req, "epic_link", None)
        return link.match(self, params) if link is not None else super().match_prefix(params)

    def match_plain(self, params: MatchPrefixParams) -> MatchResult:
        return super().match_prefix(params)

    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int) -> None:
        link = getattr(req, "epic_link", None)
        if link is None:
            super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        else:
            link.release(self, req, kv_len_to_handle)

    def cache_unfinished_req(self, req, chunked: bool = False) -> None:
        link = getattr(req, "epic_link", None)
        if link is None:
            super().cache_unfinished_req(req, chunked=chunked)
        elif chunked:  # linked KV is never published mid-request, but a request SGLang cut goes on
            link.keep_chunk(self, req)

    def is_live(self, node: TreeNode) -> bool:
        """False once the node was evicted (or is the root's stand-in of nothing)."""
        parent = node.parent
        return parent is None or parent.children.get(node.key.child_key(self.page_size)) is node

    # ----------------------------------------------------------------- exact prefixes
    def match_exact_prefix(self, token_ids: Sequence[int], namespace: str | None) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest cached exact prefix and its last node (lock it while in use)."""
        result = self.match_prefix(MatchPrefixParams(key=RadixKey(array("q", token_ids), namespace)))
        self.counters.prefix_hit_tokens += len(result.device_indices)
        return result.device_indices, result.last_device_node

    def publish_exact_prefix(self, token_ids: Sequence[int], slots: torch.Tensor, namespace: str | None) -> int:
        """Hand exactly computed KV to the tree. Returns how many leading tokens were already
        cached: the caller still owns (and frees) its slots for those; the rest now belong
        to the tree."""
        key = RadixKey(array("q", token_ids), namespace)
        return self.insert(InsertParams(key=key, value=slots.to(torch.int64).clone())).prefix_len

    # ----------------------------------------------------------------- documents
    def match_document(self, key: str, token_ids: Sequence[int]) -> TreeNode | None:
        """The document's node on the device, reloading it from host or disk if needed;
        None on a miss. The node is unlocked: lock it before allocating anything else."""
        result = self.match_prefix(MatchPrefixParams(key=RadixKey(array("q", token_ids), doc_extra_key(key))))
        if len(result.device_indices) == len(token_ids):
            self.counters.device_hits += 1
            self.counters.reused_document_tokens += len(token_ids)
            return result.last_device_node
        entry, tier = (self.host.pop(key) if self.host else None), "host"
        if entry is None and self.disk is not None:
            entry, tier = self.disk.get(key), "disk"
        if entry is None or entry.token_ids != tuple(token_ids):
            self.counters.misses += 1
            return None
        slots = self.alloc_slots(len(token_ids))
        if slots is None:
            if tier == "host":
                self.host.put(key, entry.token_ids, entry.k, entry.v)
            self.counters.misses += 1
            return None
        scatter_kv(self.kv_pool, slots, entry.k, entry.v)
        setattr(self.counters, f"{tier}_hits", getattr(self.counters, f"{tier}_hits") + 1)
        self.counters.reused_document_tokens += len(token_ids)
        return self._insert_document_node(key, token_ids, slots)

    def insert_document(self, key: str, token_ids: Sequence[int], slots: torch.Tensor, *,
                        namespace: str | None, recipe: str) -> TreeNode:
        """Adopt freshly compiled document KV (the tree now owns `slots`); write it through
        to disk when a disk tier is configured."""
        result = self._adopt(key, token_ids, slots, namespace, recipe)
        if result.prefix_len:
            raise RuntimeError(f"document {key[:12]} is already cached; match it before compiling")
        return result.last_device_node

    def adopt_document(self, key: str, token_ids: Sequence[int], slots: torch.Tensor, *,
                       namespace: str | None, recipe: str) -> int:
        """`insert_document` for a compile that may have raced another: returns how many
        leading tokens were already cached (the caller frees its slots for those)."""
        return self._adopt(key, token_ids, slots, namespace, recipe).prefix_len

    def _adopt(self, key: str, token_ids: Sequence[int], slots: torch.Tensor, namespace: str | None, recipe: str):
        result = self.insert(InsertParams(key=RadixKey(array("q", token_ids), doc_extra_key(key)),
                                          value=slots.to(torch.int64)))
        if result.prefix_len < len(token_ids) and self.disk is not None and not self.disk.contains(key):
            k, v = gather_kv(self.kv_pool, slots)
            self.disk.put(key, namespace, recipe, tuple(token_ids), k, v)
        return result

    def _insert_document_node(self, key: str, token_ids: Sequence[int], slots: torch.Tensor) -> TreeNode:
        result = self.insert(InsertParams(key=RadixKey(array("q", token_ids), doc_extra_key(key)),
                                          value=slots.to(torch.int64)))
        if result.prefix_len:
            raise RuntimeError(f"document {key[:12]} is already cached; match it before compiling")
        return result.last_device_node

    def document_slots(self, node: TreeNode) -> torch.Tensor:
        """All slots of the document ending at `node` (a document node split by a partial
        match is a chain under the root)."""
        parts = []
        while node is not self.root_node:
            parts.append(node.value)
            node = node.parent
        return torch.cat(parts[::-1])

    def document_nodes(self) -> dict[str, TreeNode]:
        """Device-resident documents by DocKey."""
        return {key_of_extra(n.key.extra_key): n for n in self.root_node.children.values()
                if key_of_extra(n.key.extra_key) is not None}

    # ----------------------------------------------------------------- eviction
    def _delete_leaf(self, node: TreeNode) -> None:
        key = key_of_extra(node.key.extra_key)
        if key is None:
            self.counters.evicted_prefix_tokens += len(node.key)
        else:
            self.counters.evicted_documents += 1
            if self._demote_on_evict and self.host is not None:
                # evict() freed these slots a moment ago, but nothing has been allocated
                # since (on GPU, any later write is queued behind this copy).
                k, v = gather_kv(self.kv_pool, node.value)
                self.host.put(key, tuple(node.key.token_ids), k, v)
        super()._delete_leaf(node)

    def close(self) -> None:
        """Finish the tiers' background work (queued disk writes)."""
        if self.disk is not None:
            self.disk.drain()

    def flush(self) -> int:
        """Drop every unlocked node and the host tier (the disk tier stays: it is the
        persistent copy). Returns the number of device tokens freed."""
        self._demote_on_evict = False
        try:
            freed = self.evict(EvictParams(num_tokens=self.evictable_size())).num_tokens_evicted
        finally:
            self._demote_on_evict = True
        if self.host is not None:
            self.host.clear()
        return freed

    # ----------------------------------------------------------------- metrics
    def stats(self) -> dict[str, int]:
        docs = self.document_nodes()
        document_tokens = sum(len(n.value) for n in docs.values())
        device_tokens = self.total_size()
        return {
            **asdict(self.counters),
            "device_documents": len(docs),
            "device_document_tokens": document_tokens,
            "device_prefix_tokens": device_tokens - document_tokens,
            "device_bytes": device_tokens * self.layout.token_bytes,
            "host_documents": len(self.host.entries) if self.host else 0,
            "host_bytes": self.host.nbytes if self.host else 0,
            "host_evictions": self.host.evictions if self.host else 0,
            "disk_documents": self.disk.count() if self.disk else 0,
            "disk_bytes": self.disk.nbytes() if self.disk else 0,
            "disk_refused": self.disk.refused if self.disk else 0,
        }
