"""Where the plugin enters SGLang (HookRegistry targets, all in the scheduler process).

| target                                    | what happens there                              |
|-------------------------------------------|-------------------------------------------------|
| `Req.__init__` (after)                    | an `epic:` extra_key becomes `req.epic_link`    |
| `PrefillAdder.add_one_req` (around)       | re-match stale nodes, never chunk a link pass,  |
|                                           | lock documents; a CacheBlend pass runs alone    |
| `ScheduleBatch.prepare_for_extend` (before)| the link pass starts; reused tokens count as cached |
| `ForwardBatch.init_new` (after)           | positions, the plan of the shared runs' entries |
| `PrefillCudaGraphRunner.can_run_graph`    | with EPIC_SGLANG_PREFILL_GRAPHS=1, a link pass   |
|                                           | replays SGLang's prefill graph, querylink's and  |
|                                           | CacheBlend's eagerly (`prefill_graphs`)          |
| `DecodeCudaGraphRunner.can_run_graph`     | a decode step over shared documents replays the |
|                                           | smallest `epic` graph it fits (`decode_graphs`), else runs eagerly |
| `EagerRunner.load_batch` (after)          | the plan survives the copy into static buffers  |
| `FlashInferAttnBackend.init_forward_metadata` | plan the link entries                        |
| `Scheduler.get_new_batch_prefill` (around), | at most N prefill batches in a row while requests |
| unless EPIC_SGLANG_MAX_CONSECUTIVE_PREFILLS=0 | decode (`decode_turns`; 1 by default)           |
| `LlamaDecoderLayer.forward`, `Qwen2DecoderLayer.forward` (around) | querylink: its scout before the |
|                                           | first layer (`scout.py`); CacheBlend: past its  |
|                                           | check layer, the picks only (`blend.py`)        |
| `DecodeCudaGraphRunner.capture` (before), `.capture_one_shape`, `._resolve_lora_variant`, | the `epic` |
| `.load_batch`, `FlashInferAttnBackend.init_forward_metadata_out_graph` (around) | decode graphs, one per tier |
| `SchedulerProfilerManager._profile` (around) | /start_profile with activities ["HOST"]: the  |
|                                           | scheduler thread's stacks sampled (`host_profile`) |
| `watchdog.pyspy_dump_schedulers` (around) | a stalled forward: the process's Python stacks logged |

Matching and release need no hook: the `epic` radix cache defers to `req.epic_link`.
"""
from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from epic_sglang.sglang_plugin import (attention, blend, decode_graphs, decode_turns, host_profile, prefill_graphs, scout,
                                      wire)
from epic_sglang.sglang_plugin.gathered import link_attention_mode
from epic_sglang.sglang_plugin.link_request import CompileRequest, LinkRequest
from epic_sglang.sglang_plugin.rotary import RopeTable

logger = logging.getLogger(__name__)

SCHEDULE_BATCH = "sglang.srt.managers.schedule_batch"
DECODE_GRAPHS = "sglang.srt.model_executor.runner.decode_cuda_graph_runner"


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


def blends(req) -> bool:
    link = getattr(req, "epic_link", None)
    return isinstance(link, LinkRequest) and link.blend is not None


def admit_link(original, adder, req, has_chunked_req: bool = False, **kwargs):
    """PrefillAdder.add_one_req for a linked request (and for any request behind a CacheBlend
    link pass, which runs alone in its batch)."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    if any(blends(r) for r in adder.can_run_list):
        return AddReqResult.OTHER
    link = getattr(req, "epic_link", None)
    if not isinstance(link, LinkRequest) or link.layout is None:
        return original(adder, req, has_chunked_req=has_chunked_req, **kwargs)
    cache = adder.tree_cache
    if not link.still_matched(cache, req.last_node):
        req.init_next_round_input(cache)
    if blends(req) and (adder.can_run_list or has_chunked_req):
        return AddReqResult.OTHER  # the check layer cuts the whole batch: wait for one of its own
    layout = link.layout
    if adder.rem_chunk_tokens is not None and layout.extend_len > adder.rem_chunk_tokens:
        # A link pass is never chunked (its runs' entries are planned for the whole pass): wait for an
        # emptier batch, or compute the prompt in full if even an empty one is too small.
        if adder.can_run_list or has_chunked_req:
            return AddReqResult.OTHER
        logger.warning("epic: request %s computes %d tokens at link time, more than the %d-token chunk; "
                       "serving it without linking", req.rid, layout.extend_len, adder.rem_chunk_tokens)
        link.fall_back(req, cache)
        return original(adder, req, has_chunked_req=has_chunked_req, **kwargs)
    # SGLang's own budget counts the link pass's extend and the new tokens: the reused
    # tokens take no slots of the request's. Its documents are locked before that budget is
    # read (as SGLang locks a prefix's node, `_lock_node`): locked, they are no longer
    # evictable, so they no longer count as room for this request's own tokens
    link.admit(cache)
    result = original(adder, req, has_chunked_req=has_chunked_req, **kwargs)
    if not (adder.can_run_list and adder.can_run_list[-1] is req):
        link.unlock(cache)
    return result


def start_link_passes(batch, *args, **kwargs):
    """ScheduleBatch.prepare_for_extend: before SGLang writes the rows."""
    for req in batch.reqs:
        link = getattr(req, "epic_link", None)
        if isinstance(link, LinkRequest) and link.admitted and not link.prepared:
            link.start_link_pass(req)
    return None


def prepare_links(links: dict[int, LinkRequest], batch, rope: RopeTable, decode: bool = False) -> attention.LinkAttentionPlan:
    """Plan the batch's link attention; the link passes in it are then under way."""
    plan = attention.build_plan(batch, links, rope, decode)
    for link in links.values():
        link.extending = False
    return plan


def link_forward_batch(forward_batch, cls, batch, model_runner, *args, **kwargs):
    """ForwardBatch.init_new: runs on the forward stream, right before the model."""
    mode = forward_batch.forward_mode
    links = attention.batch_links(batch) if mode.is_extend() or mode.is_decode() else {}
    if not links:
        return forward_batch
    plan = prepare_links(links, batch, model_rope(model_runner), decode=mode.is_decode())
    if plan.blend is not None:
        why = "its batch holds other requests (SGLang's mixed chunks)" if len(batch.reqs) > 1 else unhooked(model_runner)
        if why:
            compute_blend_fully(plan.blend.req, why)
            plan.blend = None
    if plan.scouts:
        why = unhooked(model_runner) or scout.unread_rope(plan.rope, model_runner.model_config.head_dim)
        if why:
            for pending in plan.scouts:
                link_without_scout(pending.req, why)
            plan.scouts = []
        else:
            plan.model = model_runner.model
    attention.apply_positions(plan, forward_batch.positions)
    forward_batch.epic_plan = plan
    return forward_batch


def unhooked(model_runner) -> str | None:
    """Why CacheBlend's cut and querylink's scout cannot run in the model's decoder layers
    (None: they run through `link_layer`, `blend.HOOKED_LAYERS`; found once per model)."""
    hooked = getattr(model_runner, "epic_layers_hooked", None)
    if hooked is None:
        hooked = model_runner.epic_layers_hooked = blend.supports(model_runner.model)
    return None if hooked else "the model's decoder layers are not Llama's or Qwen2's"


def compute_blend_fully(req, why: str) -> None:
    """A CacheBlend link pass the check layer cannot cut (a model whose layers the plugin
    does not hook, or a batch it does not hold alone): every token is computed through every
    layer (its row holds the whole prompt), and reported so."""
    logger.warning("epic: CacheBlend request %s is computed in full: %s", req.rid, why)
    if not req.retracted_stain:
        req.cached_tokens -= req.epic_link.reused_tokens
    req.epic_link.reused_tokens = 0


def link_without_scout(req, why: str) -> None:
    """A querylink link pass whose scout cannot run (`why`): its row's stand-ins (as many
    tokens, in legolink's order) are computed instead of picks, and reported so."""
    logger.warning("epic: querylink request %s is linked with its stand-ins (legolink's order), no scout: %s",
                   req.rid, why)
    req.epic_link.scout = None


def link_layer(original, layer, positions, hidden_states, forward_batch, residual, *args, **kwargs):
    """A decoder layer's forward (SGLang: `layer(positions, hidden_states, forward_batch,
    residual)`): querylink's scouts run before the first layer of a forward with querylink link
    passes, which then starts from the new rows' embeddings; CacheBlend's cut is `blend.blend_layer`'s."""
    plan = getattr(forward_batch, "epic_plan", None)
    if plan is not None and plan.scouts:  # only in the first layer: the scouts clear them
        from sglang.srt.model_executor.forward_context import get_attn_backend, get_token_to_kv_pool

        hidden_states = scout.scout_and_link(original, plan, positions, hidden_states, forward_batch,
                                             get_token_to_kv_pool(), get_attn_backend())
    return blend.blend_layer(original, layer, positions, hidden_states, forward_batch, residual, *args, **kwargs)


def model_rope(model_runner) -> RopeTable:
    rope = getattr(model_runner, "epic_rope", None)
    if rope is None:
        rope = model_runner.epic_rope = RopeTable.of_model(model_runner.model)
    return rope


def decode_graph_for_links(original, runner, forward_batch, *args, **kwargs):
    plan = getattr(forward_batch, "epic_plan", None)
    runs = (decode_graphs.runs_in_graph(plan, forward_batch.batch_size, getattr(runner, "record_nolora_graph", False))
            and original(runner, forward_batch, *args, **kwargs))
    if not runs and decode_graphs.needs_variant(plan):
        decode_graphs.STEPS.add("eager")
    return runs


def rope_for_capture(runner, *args, **kwargs):
    """DecodeCudaGraphRunner.capture: the graphs' shared entries rotate by the model's RoPE."""
    runner.attn_backend.epic_rope = model_rope(runner.model_runner)


def capture_link_variant(original, runner, size, forward, stream_idx=None, variant_label=None):
    """DecodeCudaGraphRunner.capture_one_shape: SGLang's graph of this size, then the `epic`
    ones beside it, one per tier (none when SGLang captures LoRA variants: linked steps then
    run eagerly)."""
    original(runner, size, forward, stream_idx, variant_label)
    if variant_label is None and not getattr(runner, "record_nolora_graph", False):
        for parts in decode_graphs.PART_TIERS:
            runner.attn_backend.epic_capturing = parts
            try:
                original(runner, size, forward, stream_idx, decode_graphs.variant(parts))
            finally:
                runner.attn_backend.epic_capturing = None


def link_graph_variant(original, runner, forward_batch, *args, **kwargs):
    """DecodeCudaGraphRunner._resolve_lora_variant: a step over shared documents replays the
    `epic` graph of the smallest tier that holds it."""
    label = original(runner, forward_batch, *args, **kwargs)
    plan = getattr(forward_batch, "epic_plan", None)
    if label is not None or not decode_graphs.needs_variant(plan):
        return label
    return decode_graphs.variant(decode_graphs.graph_parts(plan, plan.batch_size))


def replay_with_plan(original, runner, forward_batch, *args, **kwargs):
    """DecodeCudaGraphRunner.load_batch: the step's plan reaches the backend's replay
    planning (SGLang hands the backend a view without it)."""
    runner.attn_backend.epic_replay_plan = getattr(forward_batch, "epic_plan", None)
    try:
        return original(runner, forward_batch, *args, **kwargs)
    finally:
        runner.attn_backend.epic_replay_plan = None


def graph_link_metadata(original, backend, forward_batch, *args, in_capture: bool = False, **kwargs):
    """FlashInferAttnBackend.init_forward_metadata_out_graph: at the `epic` capture, SGLang's
    graph wrapper of the batch size (made at its own capture, and read by that graph: planned
    again, not made anew) is wrapped in a LinkWrapper over the size's static entries; before
    an `epic` replay, those are refilled from the step's plan."""
    if not forward_batch.forward_mode.is_decode_or_idle():
        return original(backend, forward_batch, *args, in_capture=in_capture, **kwargs)
    from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata

    bs = forward_batch.batch_size  # the captured size (a replayed step is padded to it)
    parts = getattr(backend, "epic_capturing", None) if in_capture else None  # the tier being captured
    result = original(backend, forward_batch, *args, in_capture=in_capture and parts is None, **kwargs)
    plan = getattr(backend, "epic_replay_plan", None)
    if parts is not None:
        graph = decode_graphs.captured(backend, bs, parts, backend.epic_rope)
        backend.forward_metadata = DecodeMetadata([graph.link_wrapper(backend.decode_cuda_graph_metadata[bs][0])])
    elif not in_capture and decode_graphs.needs_variant(plan):  # the tier `link_graph_variant` chose
        parts = decode_graphs.graph_parts(plan, plan.batch_size)
        backend.epic_decode_graphs[bs, parts].fill(backend, plan)
        decode_graphs.STEPS.add(decode_graphs.variant(parts))
    return result


def keep_plan(result, runner, forward_batch, *args, **kwargs):
    """The eager runner hands the model a `dataclasses.replace` copy of the batch, which
    drops attributes that are not fields."""
    plan = getattr(forward_batch, "epic_plan", None)
    if plan is not None:
        result.epic_plan = plan
    return result


def plan_link_attention(original, backend, forward_batch, *args, **kwargs):
    plan = getattr(forward_batch, "epic_plan", None)
    if plan is None or plan.local is None:  # decode: SGLang plans its own wrapper first
        result = original(backend, forward_batch, *args, **kwargs)
        if plan is None:
            return result
    attention.plan_flashinfer(backend, plan)


def install() -> None:
    link_attention_mode()  # a bad EPIC_SGLANG_LINK_ATTENTION stops the server's start, not each forward
    prefill_graphs.enabled()  # so does a bad EPIC_SGLANG_PREFILL_GRAPHS
    if limit := decode_turns.max_consecutive_prefills():
        HookRegistry.register(decode_turns.TARGET, decode_turns.yield_to_decode(limit), HookType.AROUND)
    for target, hook, kind in [
        (f"{SCHEDULE_BATCH}.Req.__init__", attach_link, HookType.AFTER),
        ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", admit_link, HookType.AROUND),
        (f"{SCHEDULE_BATCH}.ScheduleBatch.prepare_for_extend", start_link_passes, HookType.BEFORE),
        ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", link_forward_batch, HookType.AFTER),
        ("sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph",
         prefill_graphs.link_passes_in_graphs, HookType.AROUND),
        (f"{DECODE_GRAPHS}.DecodeCudaGraphRunner.can_run_graph", decode_graph_for_links, HookType.AROUND),
        ("sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch", keep_plan, HookType.AFTER),
        ("sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend.init_forward_metadata",
         plan_link_attention, HookType.AROUND),
        ("sglang.srt.managers.scheduler_components.profiler_manager.SchedulerProfilerManager._profile",
         host_profile.profile_host, HookType.AROUND),
        ("sglang.srt.utils.watchdog.pyspy_dump_schedulers", host_profile.log_stalled_stacks, HookType.AROUND),
    ] + [(f"{layer}.forward", link_layer, HookType.AROUND) for layer in blend.HOOKED_LAYERS]:
        HookRegistry.register(target, hook, kind)
    if decode_graphs.enabled():
        for target, hook, kind in [
            (f"{DECODE_GRAPHS}.DecodeCudaGraphRunner.capture", rope_for_capture, HookType.BEFORE),
            (f"{DECODE_GRAPHS}.DecodeCudaGraphRunner.capture_one_shape", capture_link_variant, HookType.AROUND),
            (f"{DECODE_GRAPHS}.DecodeCudaGraphRunner._resolve_lora_variant", link_graph_variant, HookType.AROUND),
            (f"{DECODE_GRAPHS}.DecodeCudaGraphRunner.load_batch", replay_with_plan, HookType.AROUND),
            ("sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend.init_forward_metadata_out_graph",
             graph_link_metadata, HookType.AROUND),
        ]:
            HookRegistry.register(target, hook, kind)
