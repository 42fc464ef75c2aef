"""Paged KV storage in SGLang's shape (page size 1).

- `KVPool`: per-layer K and V buffers indexed by token slot (SGLang's `MHATokenToKVPool`).
  Keys are stored un-rotated (see `models/rope.py`). Slot 0 is a reserved padding slot.
- `SlotAllocator`: hands out and takes back token slots (SGLang's `TokenToKVPoolAllocator`).
- `ReqToTokenPool`: one row per running request mapping prompt position -> token slot
  (SGLang's `req_to_token`). A linked request's row mixes shared document slots and
  request-private slots; attention reads the row, so the shared slots are never copied.
"""
from __future__ import annotations

import torch


class KVPool:
    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.size = size
        shape = (size + 1, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def get_key_buffer(self, layer: int) -> torch.Tensor:
        return self.k_buffer[layer]

    def get_value_buffer(self, layer: int) -> torch.Tensor:
        return self.v_buffer[layer]

    def set_kv_buffer(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer][loc] = k
        self.v_buffer[layer][loc] = v

    def copy_slots(self, layer: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.k_buffer[layer][dst] = self.k_buffer[layer][src]
        self.v_buffer[layer][dst] = self.v_buffer[layer][src]


class PoolExhausted(RuntimeError):
    pass


class SlotAllocator:
    """Free list of token slots 1..size; refuses double frees so leaks and bugs surface."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self.in_use = torch.zeros(self.size + 1, dtype=torch.bool, device=self.device)

    def available_size(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, need: int) -> torch.Tensor | None:
        if need > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:need], self.free_slots[need:]
        self.in_use[out] = True
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        if not bool(self.in_use[slots].all()) or slots.unique().numel() != slots.numel():
            raise RuntimeError("KV slot freed twice or never allocated")
        self.in_use[slots] = False
        self.free_slots = torch.cat((self.free_slots, slots.to(self.free_slots.dtype)))


class ReqToTokenPool:
    def __init__(self, max_requests: int, max_context_len: int, device: torch.device):
        self.req_to_token = torch.zeros((max_requests, max_context_len), dtype=torch.int64, device=device)
        self.free_rows = list(range(max_requests))

    def alloc(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free(self, row: int) -> None:
        if row in self.free_rows:
            raise RuntimeError(f"request row {row} freed twice")
        self.free_rows.append(row)
