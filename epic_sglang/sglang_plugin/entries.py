"""FlashInfer paged-prefill entries as the plugin plans them, and one attention call over them.

An entry is a range of the batch's query rows over a list of KV pages (pool slots, page size
1, or a scratch's pages of `link_plan.GATHER_PAGE` keys); its queries are its last keys
(causal alignment is bottom-right). Offsets stay on the host: FlashInfer plans from host
copies, and one read back from the device would wait for the forward still running (SGLang
overlaps planning with it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Entries:
    """One paged-prefill wrapper's plan: query rows and KV pages of every entry."""
    qo_indptr: torch.Tensor  # int32, host
    kv_indptr: torch.Tensor  # int32, host
    kv_indices: torch.Tensor  # int32, device: pool slots (page 1) or scratch pages
    page: int = 1
    last_page_len: torch.Tensor | None = None  # int32, host (None: every page full, as with page 1)


def indptr(lens: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))


def last_page_lens(entries: int) -> torch.Tensor:
    """Every page's last length, page size 1, on the host: FlashInfer's plan reads it back with
    `.to("cpu")`, which on a device tensor waits for the forward queued before it."""
    return torch.ones(entries, dtype=torch.int32)


def plan_entries(wrapper, backend, entries: Entries, **kwargs) -> None:
    """Plan `wrapper` (a paged-prefill one) with `entries`, in the model's shapes (SGLang's `backend`)."""
    updater = backend.indices_updater_prefill
    last = entries.last_page_len if entries.last_page_len is not None else last_page_lens(len(entries.kv_indptr) - 1)
    wrapper.begin_forward(entries.qo_indptr, entries.kv_indptr, entries.kv_indices, last,
                          updater.num_qo_heads, updater.num_kv_heads, updater.head_dim, entries.page,
                          q_data_type=updater.q_data_type, kv_data_type=updater.data_type, non_blocking=True, **kwargs)


def attend_with_lse(wrapper, q: torch.Tensor, kv_cache, causal: bool = False, sm_scale: float | None = None,
                    logits_soft_cap: float | None = None, window_left: int = -1, k_scale: float | None = None,
                    v_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's `forward_return_lse` into an output left unfilled: every query row of the
    plugin's entries reads keys, so the zero fill of the output FlashInfer would allocate
    (`torch.zeros` in its `run`; 3 ms of a 32K link pass) is wasted. The attention's settings
    (SGLang passes them per layer) are set on the wrapper as `forward_return_lse` sets them
    (FlashInfer 0.6.14)."""
    wrapper._causal, wrapper._pos_encoding_mode, wrapper._use_fp16_qk_reduction = causal, "NONE", False
    wrapper._window_left, wrapper._logits_soft_cap, wrapper._sm_scale = window_left, logits_soft_cap, sm_scale
    wrapper._rope_scale = wrapper._rope_theta = None
    return wrapper.run(q, kv_cache, k_scale=k_scale, v_scale=v_scale, out=torch.empty_like(q), return_lse=True)


def require_plain_softmax(what: str, head_dim: int, sm_scale: float | None = None,
                          logits_soft_cap: float | None = None, **_) -> None:
    """Our Triton attention kernels (the scout's, `local_attention`) scale by head_dim ** -0.5
    and cap nothing: refuse a layer whose attention SGLang runs otherwise."""
    if (sm_scale is not None and abs(sm_scale * head_dim ** 0.5 - 1) > 1e-6) or logits_soft_cap:
        raise NotImplementedError(f"epic: {what} needs attention scaled by head_dim ** -0.5, no soft cap")
