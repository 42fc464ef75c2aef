"""Link passes inside SGLang's prefill CUDA graphs, behind EPIC_SGLANG_PREFILL_GRAPHS=1 until a
GPU run has measured them (0, the default: SGLang starts with --disable-prefill-cuda-graph and
every prefill runs eagerly).

SGLang 0.5.16's default prefill graph backend ("breakable") replays each layer's kernels from a
graph and runs attention eagerly between the captured pieces, with the live batch's attention
metadata: the `LinkWrapper` planned by `attention.plan_flashinfer` attends there as it does in an
eager pass, and the positions it rotates by reach the graph through SGLang's static buffers. On
the RAG load the GPU was busy half the time (BENCHMARKS.md, session 24): the eager passes' kernel
launches are host work a graph saves. querylink's scout and CacheBlend's cut change what the
layers compute, so their passes stay eager.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from epic_sglang.sglang_plugin.tally import Tally

if TYPE_CHECKING:
    from epic_sglang.sglang_plugin.attention import LinkAttentionPlan

VARIABLE = "EPIC_SGLANG_PREFILL_GRAPHS"
PASSES = Tally("link passes", every=200)  # "graph" or "eager", counted where SGLang's prefill graphs run


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    value = env.get(VARIABLE, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{VARIABLE} must be 0 (link passes eager) or 1 (in SGLang's prefill graphs), got {value!r}")
    return value == "1"


def server_flags(env: Mapping[str, str] = os.environ) -> list[str]:
    """SGLang's flags for its prefill graphs: off unless link passes may run in them."""
    return [] if enabled(env) else ["--disable-prefill-cuda-graph"]


def graph_holds(plan: LinkAttentionPlan) -> bool:
    """Whether a link pass runs as the captured layers do: its attention alone differs."""
    return not plan.scouts and plan.blend is None


def link_passes_in_graphs(original, runner, forward_batch, *args, **kwargs) -> bool:
    """PrefillCudaGraphRunner.can_run_graph: a link pass replays SGLang's graph where it holds
    (and SGLang's own checks pass); querylink's and CacheBlend's passes run eagerly."""
    plan = getattr(forward_batch, "epic_plan", None)
    runs = (plan is None or graph_holds(plan)) and original(runner, forward_batch, *args, **kwargs)
    if plan is not None:
        PASSES.add("graph" if runs else "eager")
    return runs
