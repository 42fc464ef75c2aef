"""The link pass's attention on SGLang's FlashInfer backend: one causal paged-prefill
entry per computed run of a linked request (see `layout.py`), one ordinary entry per
other request of the batch, planned once per forward on the backend's own wrapper."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from epic_sglang.sglang_plugin.link_request import LinkRequest


@dataclass
class LinkAttentionPlan:
    qo_indptr: torch.Tensor  # int32, device: query rows of each entry
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor  # KV pool slots of each entry's keys, the entry's queries last
    positions: dict[int, torch.Tensor]  # batch token offset -> positions of a linked request's extend


def build_plan(batch, links: dict[int, LinkRequest]) -> LinkAttentionPlan:
    """`batch`: a SGLang ScheduleBatch in extend mode; `links`: its linked requests by index."""
    pool_rows, kv_rows, qo_lens, kv_lens, positions = [], [], [], [], {}
    offset = 0
    for i, req in enumerate(batch.reqs):
        extend_len = batch.extend_lens[i]
        link = links.get(i)
        if link is None:
            seq_len = int(batch.seq_lens_cpu[i])
            rows, kv, qo = np.arange(seq_len), [seq_len], [extend_len]
        else:
            rows, kv = link.layout.kv_rows()
            qo = link.layout.qo_lens()
            positions[offset] = torch.from_numpy(link.layout.extend_positions)
        pool_rows.append(np.full(len(rows), req.req_pool_idx, dtype=np.int64))
        kv_rows.append(rows)
        qo_lens.extend(qo)
        kv_lens.extend(kv)
        offset += extend_len
    device = batch.device
    req_to_token = batch.req_to_token_pool.req_to_token
    kv_indices = req_to_token[torch.from_numpy(np.concatenate(pool_rows)).to(device),
                              torch.from_numpy(np.concatenate(kv_rows)).to(device)].to(torch.int32)

    def indptr(lens: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device)

    return LinkAttentionPlan(indptr(qo_lens), indptr(kv_lens), kv_indices, positions)


def apply_positions(plan: LinkAttentionPlan, positions: torch.Tensor) -> None:
    """Prompt positions for the linked requests' new tokens (SGLang numbered them as if
    they followed their prefix in the row)."""
    for offset, pos in plan.positions.items():
        positions[offset:offset + len(pos)] = pos.to(positions.device, positions.dtype, non_blocking=True)


def plan_flashinfer(backend, plan: LinkAttentionPlan) -> None:
    """Plan the backend's paged prefill wrapper with the link entries (no ragged pass:
    SGLang then writes the new KV before attending, so entries see each other's runs)."""
    from sglang.srt.layers.attention.flashinfer_backend import PrefillMetadata

    if backend.num_wrappers != 1:
        raise NotImplementedError("epic: linking needs a model without sliding-window or cross attention")
    updater = backend.indices_updater_prefill
    entries = len(plan.qo_indptr) - 1
    backend.prefill_wrappers_paged[0].begin_forward(
        plan.qo_indptr, plan.kv_indptr, plan.kv_indices,
        torch.ones(entries, dtype=torch.int32, device=plan.kv_indices.device),
        updater.num_qo_heads, updater.num_kv_heads, updater.head_dim, 1,
        q_data_type=updater.q_data_type, kv_data_type=updater.data_type, non_blocking=True)
    backend.forward_metadata = PrefillMetadata(backend.prefill_wrappers_paged, False, False)
