"""What the `epic` radix cache does for a request that carries a link hint.

`PICRadixCache` hands `match_prefix` and the end of a request to `req.epic_link` when
the plugin attached one (see `hooks.py`):

- `CompileRequest`: the input is one document. It is prefilled like any prompt, at
  position 0 with nothing before it, and at the end its KV becomes the document's node
  (under its DocKey) instead of an exact prefix. For legolink0 the input is the sink
  tokens, then the document: the sinks' KV is dropped and the document is keyed under
  the sink recipe (its keys are rotated from position `sink` on).
- `LinkRequest`: at match time the exact prefix and every document are looked up, the row
  is planned (`layout.py`) and the request's token order is set to the row's, so SGLang's
  "cached prefix + new tokens" extend computes exactly LegoLink's tokens after the exact
  prefix. The documents' nodes are locked when the scheduler admits the request and read in
  place, in the link pass and in every decode step (`attention.py`): the forward writes only
  the request's private slots (computed and generated tokens). At the end the exact prefix
  (exact KV) is published and every private slot is freed: linked KV never enters the
  exact-prefix tree and shared document KV is never written.
  A querylink request's row is planned with legolink-k's tokens standing in for its picks
  (`link_plan.querylink_stand_in`: the count is the picks'); its scout, in the link pass's
  forward (`scout.py`), picks the tokens the question needs and `take_picks` re-plans the
  row to them, so the slots SGLang allocated hold the picks instead.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixKey

from epic_sglang.link_plan import (LinkPlan, concat_ranges, plan_spans, querylink_budget, querylink_stand_in, run_groups,
                                   with_picks)
from epic_sglang.policies import CompileRecipe
from epic_sglang.sglang_plugin.layout import RowLayout, plan_rows
from epic_sglang.sglang_plugin.wire import LinkHint
from radix_ext.doc_key import doc_extra_key, document_key


def recipe(sink: int) -> str:
    """The recipe a document is cached under: "plain" (compiled alone at position 0) or
    legolink0's sink recipe, as the engine names them."""
    return CompileRecipe(sink).name


class CompileRequest:
    def __init__(self, namespace: str | None, token_ids: array, sink: int = 0):
        self.namespace, self.sink = namespace, sink
        self.token_ids = token_ids  # the sinks, then the document
        self.key: str | None = None

    def match(self, cache, params: MatchPrefixParams) -> MatchResult:
        """Nothing is reused: a partial match would split the document's node (SGLang
        keeps one token to compute), and a document is cached whole or not at all."""
        self.key = document_key(cache.fingerprint, recipe(self.sink), self.namespace, self.token_ids[self.sink:])
        params.req.extra_key = doc_extra_key(self.key)
        return cache.match_plain(MatchPrefixParams(key=RadixKey(array("q"), params.req.extra_key)))

    def keep_chunk(self, cache, req) -> None:
        """SGLang cut the compile to fit its prefill chunk: the next chunk goes on after the
        tokens computed so far, whose slots stay the request's (SGLang's own stash would
        publish them; a document is cached whole or not at all)."""
        computed = len(req.get_fill_ids())
        req.prefix_indices = cache.req_to_token_pool.req_to_token[req.req_pool_idx, :computed].to(torch.int64)

    def release(self, cache, req, kv_len: int) -> None:
        row = cache.req_to_token_pool.req_to_token[req.req_pool_idx, :kv_len].to(torch.int64)
        n, kept, sink = len(self.token_ids), req.cache_protected_len, self.sink
        free = [row[kept:kv_len]]
        if kv_len >= n:
            cached = cache.adopt_document(self.key, self.token_ids[sink:], row[sink:n].clone(),
                                          namespace=self.namespace, recipe=recipe(sink))
            # the sinks, duplicates of tokens already cached, and the sampled tail
            free = [row[kept:max(kept, sink + cached)], row[n:kv_len]]
        cache.token_to_kv_pool_allocator.free(torch.cat(free))
        cache.dec_lock_ref(req.last_node)


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """A host array on the device without waiting for the stream: a blocking copy would wait
    for the forward queued before it (SGLang overlaps its scheduling with the GPU)."""
    return torch.from_numpy(array).to(device, non_blocking=True)


def document_tokens(plan: LinkPlan, doc_slots: dict[int, torch.Tensor], sink: int = 0
                    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Every token of the plan's cached documents, in prompt order: its prompt position, its
    document's shared slot (int64, on the pool's device) and its shift (prompt position -
    compile position; documents compiled behind `sink` tokens)."""
    spans = plan.doc_spans
    positions = concat_ranges([start for start, _, _ in spans], [start + length for start, length, _ in spans])
    shifts = np.concatenate([np.full(length, start - sink, dtype=np.int64) for start, length, _ in spans])
    return positions, torch.cat([doc_slots[j] for _, _, j in spans]).to(torch.int64), shifts


@dataclass(frozen=True)
class RunGroups:
    """A request's shared parts (`link_plan.run_groups`): part i reads the runs from run
    `first[i]` on, slots [kv_start[i], kv_start[i] + kv_len[i]) of `SharedRuns.slots` (a
    document's runs lie back to back there), its queries [q0[i], q1[i]) rotated by run
    `first[i]`'s shift (its document's); `identities[i]` names those runs (equal = same keys:
    a run's identity, or several runs' identities together)."""
    first: np.ndarray
    q0: np.ndarray
    q1: np.ndarray
    kv_start: np.ndarray
    kv_len: np.ndarray
    identities: list[tuple]


@dataclass
class SharedRuns:
    """A linked request's cached runs as its attention reads them: the runs' shared slots back
    to back, each run's length, and its shift (prompt start - compile position: the keys are
    stored rotated at the compile position)."""
    slots: torch.Tensor  # int32, on the pool's device
    lengths: list[int]
    shifts: torch.Tensor  # int64 (runs,)
    runs: list[tuple[int, int, int]]  # each run's identity (its document node's id, offset, length): equal = same keys
    docs: list[int]  # each run's document (its index in the hint): a document's runs share its shift
    cos_sin: torch.Tensor | None = None  # the queries' rotation by -shift, set where the model's RoPE is known
    _decode: RunGroups | None = None

    def groups(self, starts: list[int], queries: int) -> RunGroups:
        """The parts of `queries` queries, `starts` the first of them after each run."""
        first, end, q0, q1 = run_groups(self.docs, starts, queries)
        at = np.concatenate([[0], np.cumsum(self.lengths)])  # each run's first slot
        # a lone run is named by its own identity (hashed every decode step), several by theirs together
        return RunGroups(first, q0, q1, at[first], at[end] - at[first],
                         [self.runs[a] if b == a + 1 else tuple(self.runs[a:b]) for a, b in zip(first.tolist(), end.tolist())])

    def decode_groups(self) -> RunGroups:
        """A decode step's parts (its one query reads every document whole), the same each step."""
        if self._decode is None:
            self._decode = self.groups([0] * len(self.lengths), 1)
        return self._decode


@dataclass
class BlendSources:
    """A CacheBlend request's cached documents as its check layer reads them (`blend.py`):
    each cached document token's prompt position, shared slot and shift (prompt position -
    compile position), and the positions computed whatever the picks (outside the cached
    documents, and the last)."""
    positions: np.ndarray  # int64 (d,)
    slots: torch.Tensor  # int64 (d,), on the pool's device
    shifts: np.ndarray  # int64 (d,)
    always: np.ndarray  # bool (prompt tokens,)
    ratio: float  # percent of the d tokens picked


@dataclass
class ScoutSources:
    """A querylink request's scout (`scout.py`): its plan before the picks (each document's
    head recomputed, `pick_budget` to pick) and each cached document's shared slots (by its
    index in the hint), which the row is planned over again once the picks are known."""
    plan: LinkPlan
    doc_slots: dict[int, torch.Tensor]
    block: int
    stride: int


class LinkRequest:
    def __init__(self, hint: LinkHint, token_ids: array):
        self.hint = hint
        self.prompt = token_ids  # prompt order; the request's own origin_input_ids get the row's tokens
        self.layout: RowLayout | None = None
        self.shared: SharedRuns | None = None
        self.blend: BlendSources | None = None  # CacheBlend: every prompt token is in the row
        self.scout: ScoutSources | None = None  # querylink before its scout: the row holds stand-ins for the picks
        self.reused_tokens = 0  # document tokens whose KV comes from the cache (CacheBlend: at least)
        self.doc_nodes: list = []
        self.locked: list = []
        self.matched: tuple[int, MatchResult] | None = None  # (output tokens then, the last match's result)
        self.admitted = False  # taken into a prefill batch, documents locked
        self.prepared = False  # its extend (the link pass) was prepared
        self.extending = False  # the next extend forward is this request's link pass

    # ------------------------------------------------------------- scheduling
    def match(self, cache, params: MatchPrefixParams) -> MatchResult:
        req, ns, docs = params.req, self.hint.namespace, self.hint.docs
        if self.matched is not None and not self.admitted and self.matched[0] == len(req.output_ids) \
                and None not in self.doc_nodes and self.still_matched(cache, self.matched[1].last_device_node):
            # SGLang matches a waiting request again every scheduling round (its policy's
            # ordering, then the admission): the last match stands while every document was
            # found and nothing it found is gone (a missing one may be compiled since: look again)
            return self.matched[1]
        self.unlock(cache)  # admitted earlier, but that batch never ran
        if req.return_logprob and 0 <= req.logprob_start_len < len(self.prompt):
            req.epic_link = None  # prompt logprobs need the exact prompt: a plain request
            return cache.match_plain(params)
        tokens = self._tokens(req)  # C-level slices below, no Python lists
        ids = np.frombuffer(tokens, dtype=np.int64)
        nodes = []
        for start, end in docs:
            doc = tokens[start:end]
            node = cache.match_document(document_key(cache.fingerprint, recipe(self.hint.sink), ns, doc), doc)
            if node is not None:
                cache.inc_lock_ref(node)  # a later document's reload may evict: hold this one meanwhile
            nodes.append(node)
        exact, last_node = cache.match_exact_prefix(ids[:docs[0][0]].tolist(), ns)
        for node in nodes:
            if node is not None:
                cache.dec_lock_ref(node)
        cached = [(start, end - start, j) for j, ((start, end), node) in enumerate(zip(docs, nodes)) if node is not None]
        plan = plan_spans(len(ids), cached, self.hint.k)
        plan.blend_ratio = self.hint.blend
        if self.hint.querylink:
            plan.pick_budget = querylink_budget(plan, self.hint.query_k, self.hint.query_share)
        self.reused_tokens = plan.reused_tokens
        # CacheBlend computes every token up to its check layer: all of them in the row
        rows = plan_spans(len(ids), [], 0) if self.hint.blend else plan
        if plan.pick_budget:
            rows = with_picks(plan, querylink_stand_in(plan))
        self.layout = plan_rows(rows, len(exact))
        self.doc_nodes = nodes
        doc_slots = {j: cache.document_slots(node) for j, node in enumerate(nodes) if node is not None}
        self.shared = self._shared_runs(doc_slots)
        self.blend = self._blend_sources(plan, doc_slots) if self.hint.blend and cached else None
        self.scout = ScoutSources(plan, doc_slots, self.hint.block, self.hint.stride) if plan.pick_budget else None
        self._fill_row(req, ids)
        result = MatchResult(device_indices=exact.to(torch.int64), last_device_node=last_node,
                             last_host_node=last_node, best_match_node=last_node, cache_protected_len=len(exact))
        self.matched = (len(req.output_ids), result)
        return result

    def _tokens(self, req) -> array:
        """The sequence a link plans: the prompt, then what the request generated before a
        retraction (linked again, it is computed as prompt)."""
        return array("q", self.prompt) + array("q", req.output_ids)

    def _fill_row(self, req, ids: np.ndarray) -> None:
        """The request's input in row order: SGLang's extend computes the row's tokens."""
        layout = self.layout
        fill = ids[layout.order]
        req.origin_input_ids = array("q", fill[:int((layout.order < len(self.prompt)).sum())].tobytes())
        req.full_untruncated_fill_ids = array("q", fill.tobytes())

    def _shared_runs(self, doc_slots: dict[int, torch.Tensor]) -> SharedRuns | None:
        runs = self.layout.cached_runs
        if not runs:
            return None
        slots = torch.cat([doc_slots[r.doc][r.offset:r.offset + r.length] for r in runs]).to(torch.int32)  # on the pool's device
        # a document token at offset t was compiled at position t (+ the sinks before it)
        shifts = torch.tensor([r.start - r.offset - self.hint.sink for r in runs], dtype=torch.int64)
        identities = [(id(self.doc_nodes[r.doc]), r.offset, r.length) for r in runs]
        return SharedRuns(slots, [r.length for r in runs], shifts, identities, [r.doc for r in runs])

    def _blend_sources(self, plan: LinkPlan, doc_slots: dict[int, torch.Tensor]) -> BlendSources:
        return BlendSources(*document_tokens(plan, doc_slots, self.hint.sink), plan.recompute.numpy().copy(),
                            self.hint.blend)

    def take_picks(self, req, picks: np.ndarray) -> None:
        """querylink's scout picked `picks` (prompt positions, `pick_budget` of them): the row
        holds them instead of the stand-ins (as many: the slots SGLang allocated stay the row's)."""
        scout, extend_len = self.scout, self.layout.extend_len
        self.layout = plan_rows(with_picks(scout.plan, torch.from_numpy(picks)), self.layout.exact_prefix_len)
        if self.layout.extend_len != extend_len:
            raise RuntimeError(f"epic: querylink picked {len(picks)} tokens, not its budget of {scout.plan.pick_budget}")
        self.shared = self._shared_runs(scout.doc_slots)
        self._fill_row(req, np.frombuffer(self._tokens(req), dtype=np.int64))
        self.scout = None

    def still_matched(self, cache, last_node) -> bool:
        """False when a node found at match time (the documents', the exact prefix's
        `last_node`) was evicted since (match again)."""
        return all(cache.is_live(n) for n in [*self.doc_nodes, last_node] if n is not None)

    def admit(self, cache) -> None:
        """The scheduler took the request: hold its documents until it ends."""
        self.locked = [n for n in self.doc_nodes if n is not None]
        for node in self.locked:
            cache.inc_lock_ref(node)
        self.admitted = True

    def fall_back(self, req, cache) -> None:
        """Serve the request as a plain prompt (full prefill, exact prefix caching)."""
        req.epic_link = None
        req.origin_input_ids = self.prompt
        req.full_untruncated_fill_ids = self.prompt + array("q", req.output_ids)
        req.init_next_round_input(cache)

    def unlock(self, cache) -> None:
        """Its documents evictable again (the request ended, or the scheduler did not take it)."""
        for node in self.locked:
            cache.dec_lock_ref(node)
        self.locked, self.admitted = [], False

    def keep_chunk(self, cache, req) -> None:
        raise RuntimeError("a link pass is never cut into chunks (its entries are planned for the whole pass)")

    def start_link_pass(self, req) -> None:
        """Before the extend: the next forward is this request's link pass. SGLang reports the
        reused document tokens as cached, beside the exact prefix (once, as it counts its own)."""
        self.prepared = self.extending = True
        if not req.retracted_stain:
            req.cached_tokens += self.reused_tokens

    @property
    def position_shift(self) -> int:
        """Prompt position minus row slot of every token past the prompt's last reused one
        (the generated tokens: SGLang numbers them by their row slot)."""
        return self.layout.reused_tokens

    # ------------------------------------------------------------- end
    def release(self, cache, req, kv_len: int) -> None:
        """Publish the exact prefix (computed exactly), free every other slot this request
        owns, unlock. Also runs on retraction: the next match starts over."""
        layout = self.layout
        row = cache.req_to_token_pool.req_to_token[req.req_pool_idx, :kv_len].to(torch.int64)
        owned = np.ones(kv_len, dtype=bool)
        owned[:layout.exact_prefix_len] = False  # the tree's
        prefix_end = self.hint.docs[0][0]
        prefix_rows = layout.row_of()[:prefix_end]
        if prefix_end and prefix_rows.max() < kv_len:
            index = to_device(prefix_rows, row.device)
            cached = cache.publish_exact_prefix(self.prompt[:prefix_end].tolist(), row[index], self.hint.namespace)
            owned[prefix_rows[max(cached, layout.exact_prefix_len):]] = False  # now the tree's
        cache.token_to_kv_pool_allocator.free(row[to_device(np.flatnonzero(owned), row.device)])
        cache.dec_lock_ref(req.last_node)
        self.unlock(cache)
        self.doc_nodes, self.layout, self.shared, self.blend, self.scout, self.matched = [], None, None, None, None, None
        self.prepared = self.extending = False
