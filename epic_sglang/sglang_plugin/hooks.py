"""Where the plugin enters SGLang (HookRegistry targets, all in the scheduler process).

| target                                    | what happens there                              |
|-------------------------------------------|-------------------------------------------------|
| `Req.__init__` (after)                    | an `epic:` extra_key becomes `req.epic_link`    |
| `PrefillAdder.add_one_req` (around)       | re-match stale nodes, budget the private copies,|
|                                           | never chunk a link pass, lock documents         |
| `ScheduleBatch.prepare_for_extend` (before)| private slots into the row                      |
| `ForwardBatch.init_new` (after)           | copy + re-rotate documents, positions, plan     |
| `PrefillCudaGraphRunner.can_run_graph`    | a link pass runs eagerly                         |
| `EagerRunner.load_batch` (after)          | the plan survives the copy into static buffers  |
| `FlashInferAttnBackend.init_forward_metadata` | plan the link entries                        |

Matching and release need no hook: the `epic` radix cache defers to `req.epic_link`.
"""
from __future__ import annotations

import logging

import torch

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from epic_sglang.link_plan import CascadeTuning
from epic_sglang.sglang_plugin import attention, wire
from epic_sglang.sglang_plugin.link_request import CompileRequest, LinkRequest
from epic_sglang.sglang_plugin.rotary import RopeTable, copy_rotated

logger = logging.getLogger(__name__)

SCHEDULE_BATCH = "sglang.srt.managers.schedule_batch"


def attach_link(result, req, *args, **kwargs):
    """Req.__init__: parse the hint; the radix cache namespace becomes the tenant's."""
    if not wire.is_hint(req.extra_key):
        return result
    try:
        hint = wire.decode(req.extra_key)
        hint.validate(len(req.origin_input_ids))
    except wire.HintError as e:
        req.extra_key = None
        req.set_finish_with_abort(str(e))
        return result
    req.extra_key = hint.namespace
    req.epic_link = (CompileRequest(hint.namespace, req.origin_input_ids, hint.sink) if hint.compile
                     else LinkRequest(hint, req.origin_input_ids))
    return result


def admit_link(original, adder, req, has_chunked_req: bool = False, **kwargs):
    """PrefillAdder.add_one_req for a linked request."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    link = getattr(req, "epic_link", None)
    if not isinstance(link, LinkRequest) or link.layout is None:
        return original(adder, req, has_chunked_req=has_chunked_req, **kwargs)
    cache = adder.tree_cache
    if not link.still_matched(cache, req):
        req.init_next_round_input(cache)
    layout = link.layout
    if adder.rem_chunk_tokens is not None and layout.extend_len > adder.rem_chunk_tokens:
        # A link pass is never chunked (its entries span the whole row): wait for an
        # emptier batch, or compute the prompt in full if even an empty one is too small.
        if adder.can_run_list or has_chunked_req:
            return AddReqResult.OTHER
        logger.warning("epic: request %s computes %d tokens at link time, more than the %d-token chunk; "
                       "serving it without linking", req.rid, layout.extend_len, adder.rem_chunk_tokens)
        link.fall_back(req, cache)
        return original(adder, req, has_chunked_req=has_chunked_req, **kwargs)
    max_new = max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)
    if layout.private_tokens + layout.extend_len + max_new >= adder.rem_total_tokens:
        return AddReqResult.NO_TOKEN
    result = original(adder, req, has_chunked_req=has_chunked_req, **kwargs)
    if adder.can_run_list and adder.can_run_list[-1] is req:
        link.admit(cache)
        adder.rem_total_token_offset += layout.private_tokens
    return result


def materialize_links(batch, *args, **kwargs):
    """ScheduleBatch.prepare_for_extend: before SGLang writes the rows."""
    for req in batch.reqs:
        link = getattr(req, "epic_link", None)
        if isinstance(link, LinkRequest) and link.admitted and not link.materialized:
            link.materialize(batch.tree_cache, req)
    return None


def extending_links(batch) -> dict[int, LinkRequest]:
    """The batch's link requests about to run their link pass, by position in the batch."""
    return {i: r.epic_link for i, r in enumerate(batch.reqs)
            if isinstance(getattr(r, "epic_link", None), LinkRequest) and r.epic_link.extending}


def prepare_links(links: dict[int, LinkRequest], batch, kv_pool, rope: RopeTable,
                  tuning: CascadeTuning = CascadeTuning()) -> attention.LinkAttentionPlan:
    """Copy every link's reused tokens into its slots (one copy for the batch) and plan the
    link attention."""
    copies = [c for c in (link.take_pending_copy() for link in links.values()) if c is not None]
    if copies:
        copy_rotated(kv_pool, rope, *(torch.cat(parts) for parts in zip(*copies)))
    for link in links.values():
        link.extending = False
    return attention.build_plan(batch, links, tuning)


def link_forward_batch(forward_batch, cls, batch, model_runner, *args, **kwargs):
    """ForwardBatch.init_new: runs on the forward stream, right before the model."""
    links = extending_links(batch)
    if not links:
        return forward_batch
    rope = getattr(model_runner, "epic_rope", None)
    if rope is None:
        rope = model_runner.epic_rope = RopeTable.of_model(model_runner.model)
    plan = prepare_links(links, batch, model_runner.token_to_kv_pool, rope)
    attention.apply_positions(plan, forward_batch.positions)
    forward_batch.epic_plan = plan
    return forward_batch


def eager_for_links(original, runner, forward_batch, *args, **kwargs):
    return False if getattr(forward_batch, "epic_plan", None) is not None else original(runner, forward_batch, *args, **kwargs)


def keep_plan(result, runner, forward_batch, *args, **kwargs):
    """The eager runner hands the model a `dataclasses.replace` copy of the batch, which
    drops attributes that are not fields."""
    plan = getattr(forward_batch, "epic_plan", None)
    if plan is not None:
        result.epic_plan = plan
    return result


def plan_link_attention(original, backend, forward_batch, *args, **kwargs):
    plan = getattr(forward_batch, "epic_plan", None)
    if plan is None or forward_batch.forward_mode.is_decode_or_idle():
        return original(backend, forward_batch, *args, **kwargs)
    attention.plan_flashinfer(backend, plan)


def install() -> None:
    for target, hook, kind in [
        (f"{SCHEDULE_BATCH}.Req.__init__", attach_link, HookType.AFTER),
        ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", admit_link, HookType.AROUND),
        (f"{SCHEDULE_BATCH}.ScheduleBatch.prepare_for_extend", materialize_links, HookType.BEFORE),
        ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", link_forward_batch, HookType.AFTER),
        ("sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph",
         eager_for_links, HookType.AROUND),
        ("sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch", keep_plan, HookType.AFTER),
        ("sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend.init_forward_metadata",
         plan_link_attention, HookType.AROUND),
    ]:
        HookRegistry.register(target, hook, kind)
