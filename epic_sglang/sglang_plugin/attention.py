"""A linked request's attention on SGLang's FlashInfer backend, planned once per forward.

A linked request's row holds its private tokens in prompt order (`layout.py`), so SGLang's
own causal attention over the row gives every query the private keys before it: one causal
entry per request, as SGLang plans any extend, and SGLang's own decode plan. The reused
document tokens stay in their documents' shared slots, stored rotated at their compile
positions: the cached runs are non-causal entries over those slots, attended by the queries
after them (in decode, the one new query) rotated back by their document's shift
(`rotary.py`), so the scores are those at the linked positions. A query reads a document it
follows in one entry over all the document's runs (`link_plan.run_groups`: rotated once per
document, however many runs querylink's picks cut it into). The parts merge into the row's
result by log-sum-exp (one kernel, `epic_sglang.merge_states`).
Nothing is copied: the shared slots are read in place by every request that links them.
A prefill batch of link passes may instead attend its keys gathered in prompt order
(`gathered.py`, `EPIC_SGLANG_LINK_ATTENTION=gathered`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from epic_sglang.link_plan import concat_ranges
from epic_sglang.merge_states import MergeIndex, merge_into
from epic_sglang.sglang_plugin.entries import Entries, attend_with_lse, indptr, plan_entries
from epic_sglang.sglang_plugin import gathered
from epic_sglang.sglang_plugin.gathered import GatheredPass
from epic_sglang.sglang_plugin.link_request import BlendSources, LinkRequest, RunGroups, SharedRuns, to_device
from epic_sglang.sglang_plugin.rotary import RopeTable, rotated_rows


@dataclass
class SharedParts:
    """The batch's cached runs: entry e's queries are rotated copies of the batch's query rows
    `merge.query_rows` (by `cos_sin`, one row each) attending the run's shared slots whole."""
    entries: Entries
    cos_sin: torch.Tensor  # (gathered rows, rotary_dim) fp32 [cos | sin]
    merge: MergeIndex
    spans: list[tuple[int, int]]  # host: the batch query rows [a, b) of each entry


@dataclass
class BlendPass:
    """A CacheBlend request's link pass, alone in its batch: every prompt token up to the check
    layer, as SGLang's own extend over the row; `blend.py` cuts the batch to the picks there."""
    sources: BlendSources
    row: torch.Tensor  # int64: the request's row slots (prompt position p at row p)
    extend_start: int  # the first computed position (the exact prefix is the tree's)
    req: object  # SGLang's Req
    # set at the cut, read by the layers after it
    keep: torch.Tensor | None = None  # the batch rows still computed
    positions: torch.Tensor | None = None  # their positions
    out_cache_loc: torch.Tensor | None = None  # the whole batch's, given back after the last layer


@dataclass
class ScoutPass:
    """A querylink request's link pass before its scout ran (`scout.py`)."""
    link: LinkRequest
    req: object  # SGLang's Req
    row: torch.Tensor  # int64: the request's row slots (row slot i holds prompt position `layout.order[i]`)
    offset: int  # the batch row of its first extend token


@dataclass(frozen=True)
class LinkedRows:
    """A linked request's `n` query rows in the batch from row `offset` on: its link pass's
    extend (`extending`) or its newest tokens (decode, or merged into a mixed batch)."""
    link: LinkRequest
    offset: int
    n: int
    seq_len: int
    extending: bool
    req_pool_idx: int  # its row in SGLang's `req_to_token`


@dataclass
class LinkAttentionPlan:
    local: Entries | None  # extend: one causal entry per request over its row; decode: SGLang's own plan
    shared: SharedParts | None  # None: no linked request reuses a document token
    positions: dict[int, torch.Tensor]  # batch token offset -> prompt positions of a linked request's tokens
    rope: RopeTable  # the model's, to rotate the queries of the shared parts
    blend: BlendPass | None = None
    scouts: list[ScoutPass] = field(default_factory=list)  # querylink link passes whose scout is still to run
    linked: list[LinkedRows] = field(default_factory=list)  # what `shared` and `positions` were planned from
    model: torch.nn.Module | None = None  # the causal LM (decoder layers, embedding), set when `scouts` run
    gathered: GatheredPass | None = None  # the link passes' keys gathered in prompt order (then `shared` is None)
    req_to_token: torch.Tensor | None = None  # SGLang's, to read the linked requests' rows
    batch_size: int = 0


@dataclass
class _EntryList:
    pool_rows: list[np.ndarray] = field(default_factory=list)
    kv_rows: list[np.ndarray] = field(default_factory=list)
    qo_lens: list[int] = field(default_factory=list)

    def add(self, req_pool_idx: int, rows: np.ndarray, queries: int) -> None:
        """An entry of `queries` queries over the request's row slots `rows`."""
        self.pool_rows.append(np.full(len(rows), req_pool_idx, dtype=np.int64))
        self.kv_rows.append(np.asarray(rows, dtype=np.int64))
        self.qo_lens.append(queries)

    def build(self, req_to_token: torch.Tensor, device) -> Entries | None:
        if not self.qo_lens:
            return None
        kv_indices = req_to_token[to_device(np.concatenate(self.pool_rows), device),
                                  to_device(np.concatenate(self.kv_rows), device)].to(torch.int32)
        return Entries(indptr(self.qo_lens), indptr([len(r) for r in self.kv_rows]), kv_indices)


@dataclass
class _PartList:
    spans: list[tuple[int, int]] = field(default_factory=list)  # batch query rows of each part
    kv_starts: list[np.ndarray] = field(default_factory=list)  # each part's keys: a range of the slots below
    kv_lens: list[np.ndarray] = field(default_factory=list)
    groups: list[tuple] = field(default_factory=list)  # which shared runs each part reads
    angle_rows: list[np.ndarray] = field(default_factory=list)  # each part's rotation: a row of the angles below
    slots: list[torch.Tensor] = field(default_factory=list)  # every request's shared slots, back to back
    angles: list[torch.Tensor] = field(default_factory=list)
    num_slots: int = 0
    num_angles: int = 0

    def add(self, shared: SharedRuns, groups: RunGroups, offset: int, rope: RopeTable) -> None:
        """A request's parts, its query rows from batch row `offset` on."""
        if shared.cos_sin is None:  # once per request: decode steps reuse it
            shared.cos_sin = torch.cat(rope.angles(-shared.shifts.to(rope.cos_sin_cache.device, non_blocking=True)), -1)
        self.spans += list(zip((offset + groups.q0).tolist(), (offset + groups.q1).tolist()))
        self.kv_starts.append(self.num_slots + groups.kv_start)
        self.kv_lens.append(groups.kv_len)
        self.groups += groups.identities
        self.angle_rows.append(self.num_angles + groups.first)
        self.slots.append(shared.slots)
        self.angles.append(shared.cos_sin)
        self.num_slots += len(shared.slots)
        self.num_angles += len(shared.lengths)

    def build(self, device) -> SharedParts | None:
        """One entry per distinct group of runs: the query rows of every part that reads it back
        to back (parts in order of their group's first appearance), its keys once. So a document
        that many requests of the batch link is read once for all of them, not once per request."""
        if not self.spans:
            return None
        first_seen: dict = {}  # a group's rank: where it first appears
        ranks = np.asarray([first_seen.setdefault(group, len(first_seen)) for group in self.groups])
        order = np.argsort(ranks, kind="stable")
        spans = [self.spans[e] for e in order]
        queries = np.asarray([b - a for a, b in spans])
        firsts = np.flatnonzero(np.diff(ranks[order], prepend=-1))  # each entry's first part
        kv_starts, kv_lens = np.concatenate(self.kv_starts)[order[firsts]], np.concatenate(self.kv_lens)[order[firsts]]
        slots = torch.cat(self.slots).to(device)
        if not (np.array_equal(kv_starts, np.cumsum(kv_lens) - kv_lens) and kv_lens.sum() == self.num_slots):
            # groups that share runs (a document's picks between its runs) or read by several parts
            slots = slots[to_device(concat_ranges(kv_starts, kv_starts + kv_lens), device)]
        entries = Entries(indptr(np.add.reduceat(queries, firsts).tolist()), indptr(kv_lens.tolist()), slots)
        angles = torch.cat(self.angles).to(device)[to_device(np.concatenate(self.angle_rows)[order], device)]
        cos_sin = torch.repeat_interleave(angles, to_device(queries, device), dim=0, output_size=int(queries.sum()))
        return SharedParts(entries, cos_sin, MergeIndex.build(spans, device), spans)


def batch_links(batch) -> dict[int, LinkRequest]:
    """The batch's linked requests, by position in the batch: in their link pass or past it."""
    return {i: r.epic_link for i, r in enumerate(batch.reqs)
            if isinstance(getattr(r, "epic_link", None), LinkRequest) and r.epic_link.prepared}


def build_plan(batch, links: dict[int, LinkRequest], rope: RopeTable, decode: bool = False) -> LinkAttentionPlan:
    """`batch`: a SGLang ScheduleBatch (extend or decode); `links`: its linked requests by index.
    A request in its link pass computes its layout's extend tokens; one past it (decode, or
    merged into a mixed batch) its newest tokens, which follow every cached run."""
    local, linked, blend, scouts = _EntryList(), [], None, []
    offset = 0
    for i, req in enumerate(batch.reqs):
        seq_len = int(batch.seq_lens_cpu[i])
        n = 1 if decode else batch.extend_lens[i]
        if not decode:
            local.add(req.req_pool_idx, np.arange(seq_len), n)
        link = links.get(i)
        if link is not None:
            if link.extending and (link.blend is not None or link.scout is not None):
                row = batch.req_to_token_pool.req_to_token[req.req_pool_idx, :seq_len].to(torch.int64)
                if link.blend is not None:  # alone in its batch, unless SGLang mixed one in
                    blend = BlendPass(link.blend, row, link.layout.exact_prefix_len, req)
                else:
                    scouts.append(ScoutPass(link, req, row, offset))
            linked.append(LinkedRows(link, offset, n, seq_len, link.extending, req.req_pool_idx))
        offset += n
    device = batch.device
    req_to_token = batch.req_to_token_pool.req_to_token
    plan = LinkAttentionPlan(None if decode else local.build(req_to_token, device), None, {}, rope, blend, scouts,
                             linked, req_to_token=req_to_token, batch_size=len(batch.reqs))
    plan_linked_rows(plan, device)
    return plan


def plan_linked_rows(plan: LinkAttentionPlan, device) -> None:
    """`plan.positions` and `plan.shared` (or `plan.gathered`) from `plan.linked` as their
    layouts stand (again once querylink's scouts re-planned their rows): each linked request's
    query rows at their prompt positions, and its cached runs attended by the rows after them."""
    positions = {}
    for m in plan.linked:
        if m.extending:
            positions[m.offset] = torch.from_numpy(m.link.layout.extend_positions)
        else:  # SGLang numbers the row; the reused tokens it does not hold come before
            positions[m.offset] = torch.arange(m.seq_len - m.n, m.seq_len) + m.link.position_shift
    plan.positions = positions
    if gathered_applies(plan):
        plan.shared, plan.gathered = None, gathered.plan_pass(plan.linked, plan.req_to_token, plan.rope, device)
        return
    parts = _PartList()
    for m in plan.linked:
        if m.link.shared is not None:
            groups = (m.link.shared.groups(m.link.layout.run_query_starts(), m.n) if m.extending
                      else m.link.shared.decode_groups())
            parts.add(m.link.shared, groups, m.offset, plan.rope)
    plan.shared, plan.gathered = parts.build(device), None


def gathered_applies(plan: LinkAttentionPlan) -> bool:
    """Whether the forward's link passes attend gathered keys (`gathered.py`): asked for, and
    an extend whose requests are all linked link passes, none CacheBlend's, whose keys fit
    the scratch's bound."""
    return (plan.local is not None and plan.blend is None  # decode steps stop here
            and len(plan.linked) == plan.batch_size and all(m.extending for m in plan.linked)
            and gathered.link_attention_mode() == "gathered"
            and gathered.gathered_keys(plan.linked) <= gathered.MAX_GATHERED_KEYS)


def apply_positions(plan: LinkAttentionPlan, positions: torch.Tensor) -> None:
    """Prompt positions for the linked requests' tokens (SGLang numbered them by row slot)."""
    for offset, pos in plan.positions.items():
        positions[offset:offset + len(pos)] = pos.to(positions.device, positions.dtype, non_blocking=True)


class LinkWrapper:
    """Stands where SGLang's backend expects its paged-prefill or decode wrapper: `forward`
    attends as the wrapped one does (the private rows), then every cached run with its rotated
    queries (`merge.query_rows` rotated by `cos_sin`; None: as they are, CacheBlend's bulk
    keys), and merges the runs' results into the rows they belong to."""

    def __init__(self, own, shared_wrapper, cos_sin: torch.Tensor | None, merge: MergeIndex, rope: RopeTable):
        self.own, self.shared_wrapper, self.cos_sin, self.merge, self.rope = own, shared_wrapper, cos_sin, merge, rope

    def forward(self, q: torch.Tensor, kv_cache, **kwargs) -> torch.Tensor:
        out, lse = self.own.forward_return_lse(q, kv_cache, **kwargs)
        rotated = (q.index_select(0, self.merge.query_rows) if self.cos_sin is None
                   else rotated_rows(self.rope, q, self.merge.query_rows, self.cos_sin))
        kwargs.pop("causal", None)  # extend's mask; the shared entries attend their runs whole
        shared = attend_with_lse(self.shared_wrapper, rotated, kv_cache, **kwargs)
        merge_into(out, lse, *shared, self.merge)
        return out


def plan_flashinfer(backend, plan: LinkAttentionPlan) -> None:
    """Extend: plan the backend's paged prefill wrapper with the local entries (no ragged
    pass: SGLang then writes the new KV before attending). Decode: SGLang has planned its own
    wrapper. Then, when runs are reused, a paged prefill wrapper of ours for them, non-causal
    (an entry holds every query that reads its run; FlashInfer picks FA3 on Hopper), and the
    merge around both."""
    import flashinfer
    from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata, PrefillMetadata

    if backend.num_wrappers != 1:
        raise NotImplementedError("epic: linking needs a model without sliding-window or cross attention")
    if plan.gathered is not None:
        wrapper = gathered.plan_flashinfer(backend, plan.gathered, plan.rope)
        backend.forward_metadata = PrefillMetadata([wrapper], False, False)
        return
    decode = plan.local is None
    if decode:
        own = backend.forward_metadata.decode_wrappers[0]
    else:
        own = backend.prefill_wrappers_paged[0]
        plan_entries(own, backend, plan.local)
    if plan.shared is not None:
        shared = getattr(backend, "epic_shared_prefill", None)
        if shared is None:
            shared = backend.epic_shared_prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                backend.workspace_buffer, "NHD")
        plan_entries(shared, backend, plan.shared.entries, causal=False)
        own = LinkWrapper(own, shared, plan.shared.cos_sin, plan.shared.merge, plan.rope)
    backend.forward_metadata = DecodeMetadata([own]) if decode else PrefillMetadata([own], False, False)

