"""What one forward pass computes: a flat run of tokens from several sequences (SGLang's
ragged "extend" batch). Each sequence names the KV slots of its whole context in position
order, so a query at position p attends exactly the slots `kv_slots[: p + 1]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqView:
    kv_slots: torch.Tensor  # (n,) slots of positions 0..n-1 of this sequence
    q_start: int  # this sequence's queries are tokens [q_start, q_end) of the batch
    q_end: int
    q_positions: torch.Tensor  # (q_end - q_start,) sorted positions of the queries

    @property
    def num_queries(self) -> int:
        return self.q_end - self.q_start

    @property
    def dense(self) -> bool:
        """Queries are exactly positions 0..n-1: plain causal attention, no mask."""
        return self.num_queries == self.kv_slots.numel()

    @property
    def last_only(self) -> bool:
        """One query at the last position (decode): it sees everything, no mask."""
        return self.num_queries == 1 and int(self.q_positions[0]) == self.kv_slots.numel() - 1


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    out_slots: torch.Tensor  # (T,) where each token's fresh K/V is written
    seqs: list[SeqView]

    @classmethod
    def build(cls, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> "ForwardBatch":
        """`parts`: per sequence (input_ids, positions, out_slots, kv_slots)."""
        seqs, start = [], 0
        for ids, pos, _, kv in parts:
            seqs.append(SeqView(kv, start, start + ids.numel(), pos))
            start += ids.numel()
        return cls(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                   torch.cat([p[2] for p in parts]), seqs)

    def last_token_index(self) -> torch.Tensor:
        return torch.tensor([s.q_end - 1 for s in self.seqs], device=self.input_ids.device)
