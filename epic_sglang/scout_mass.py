"""Two Triton kernels: querylink's attention mass without materializing the attention.

The scout scores each key j by sum over (head, query i) of softmax_i(q_i . k)[j] x ||v_j||
under the link mask (j visible to i iff j <= pos_i). In torch that writes the bf16 logits
and fp32 probabilities of every (head, query, key): ~1.3 GB per layer at 32K keys and 64
queries, ~2.2 ms per scored layer on an H200. Here, over keys gathered and rotated once
(`rotate_copy`, contiguous and in position order):

1. `_lse_kernel`: per (head, query) row, the log-sum-exp (base 2) of its visible logits,
   flash-style (online max), the keys split across programs; the splits merge in torch.
2. `_mass_kernel`: per key tile, exp2(logit - lse) summed over the rows of its kv head
   (GQA: a kv head's query heads share its keys), times the values' norms.

Each reads the keys once; nothing of size rows x keys is written.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from epic_sglang.rotate_copy import rotate_copy

BLOCK_ROWS = 64  # (head, query) rows per tile
BLOCK_KEYS = 64
LSE_SPLIT_KEYS = 2048  # keys per `_lse_kernel` program: enough programs for a GPU at 8K+ keys


@triton.jit
def _lse_kernel(q, keys, row_pos, m_out, l_out, num_rows, num_keys, SPLIT_KEYS: tl.constexpr,
                KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """q: (KV_HEADS, num_rows, HEAD_DIM) pre-scaled by log2(e)/sqrt(d); keys: (num_keys,
    KV_HEADS, HEAD_DIM); row_pos: (num_rows,) each row's query position. Writes the running
    max and sum of exp2 of this program's key split: m_out, l_out (splits, KV_HEADS, num_rows)."""
    block, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    live_rows = rows < num_rows
    dims = tl.arange(0, HEAD_DIM)
    qt = tl.load(q + (kv_head * num_rows + rows[:, None]) * HEAD_DIM + dims[None, :], mask=live_rows[:, None], other=0.0)
    pos = tl.load(row_pos + rows, mask=live_rows, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    start = split * SPLIT_KEYS
    for offset in range(0, SPLIT_KEYS, BLOCK_N):  # constant trip counts: the interpreter's rule
        cols = start + offset + tl.arange(0, BLOCK_N)
        live_cols = cols < num_keys
        kt = tl.load(keys + (cols[:, None] * KV_HEADS + kv_head) * HEAD_DIM + dims[None, :], mask=live_cols[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
        s = tl.where(live_cols[None, :] & (cols[None, :] <= pos[:, None]), s, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # no visible key yet: keep l at 0
        l = l * tl.exp2(m - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m = new_m
    at = (split * KV_HEADS + kv_head) * num_rows + rows
    tl.store(m_out + at, m, mask=live_rows)
    tl.store(l_out + at, l, mask=live_rows)


@triton.jit
def _mass_kernel(q, keys, values, row_pos, lse, out, num_rows, num_keys, ROW_TILES: tl.constexpr,
                 KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """out (KV_HEADS, num_keys): per key, sum over its kv head's rows of exp2(logit - lse),
    times the norm of its value."""
    block, kv_head = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    live_cols = cols < num_keys
    dims = tl.arange(0, HEAD_DIM)
    at = (cols[:, None] * KV_HEADS + kv_head) * HEAD_DIM + dims[None, :]
    kt = tl.load(keys + at, mask=live_cols[:, None], other=0.0)
    v = tl.load(values + at, mask=live_cols[:, None], other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(ROW_TILES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        live_rows = rows < num_rows
        qt = tl.load(q + (kv_head * num_rows + rows[:, None]) * HEAD_DIM + dims[None, :], mask=live_rows[:, None], other=0.0)
        pos = tl.load(row_pos + rows, mask=live_rows, other=-1)
        row_lse = tl.load(lse + kv_head * num_rows + rows, mask=live_rows, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
        p = tl.exp2(s - row_lse[:, None])
        acc += tl.sum(tl.where(live_cols[None, :] & (cols[None, :] <= pos[:, None]), p, 0.0), 0)
    tl.store(out + kv_head * num_keys + cols, acc * tl.sqrt(tl.sum(v * v, 1)), mask=live_cols)


def attention_mass_triton(q: torch.Tensor, positions: torch.Tensor, key_buffer: torch.Tensor,
                          value_buffer: torch.Tensor, slots: torch.Tensor, key_angles: torch.Tensor,
                          split_keys: int = LSE_SPLIT_KEYS) -> torch.Tensor:
    """(n,) fp32, as `linker.attention_mass`: q (nq, heads, head_dim) rotated at `positions`
    (nq,); the keys and values of positions 0..n-1 at `slots` of the pool buffers, keys
    un-rotated, rotated here by `key_angles` ((n, head_dim) fp32 [cos | sin], `Rotary.angles`).
    `split_keys`: keys per log-sum-exp program (a multiple of BLOCK_KEYS)."""
    if split_keys % BLOCK_KEYS:
        raise ValueError(f"split_keys must be a multiple of {BLOCK_KEYS}, got {split_keys}")
    n, (nq, heads, dim), kv_heads = slots.numel(), q.shape, key_buffer.shape[1]
    group = heads // kv_heads
    keys, values = (torch.empty((n, kv_heads, dim), dtype=key_buffer.dtype, device=q.device) for _ in range(2))
    rows = torch.arange(n, device=q.device)
    rotate_copy([key_buffer], [value_buffer], [keys], [values], slots, rows, key_angles)
    # rows of kv head h: its query heads' queries, head-major (row g * nq + i: head h*group + g, query i)
    qk = (q.float() * (math.log2(math.e) / math.sqrt(dim))).to(keys.dtype)
    qk = qk.view(nq, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * nq, dim).contiguous()
    row_pos = positions.to(torch.int64).repeat(group).contiguous()
    num_rows = group * nq
    splits = triton.cdiv(n, split_keys)
    m = torch.empty((splits, kv_heads, num_rows), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    # fp32 (tests) exactly, not in TF32
    consts = dict(KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS,
                  PRECISION="ieee" if keys.dtype == torch.float32 else "tf32")
    _lse_kernel[(triton.cdiv(num_rows, BLOCK_ROWS), kv_heads, splits)](
        qk, keys, row_pos, m, l, num_rows, n, split_keys, **consts)
    top = m.max(0).values
    lse = (top + torch.log2((l * torch.exp2(m - top)).sum(0))).contiguous()
    out = torch.empty((kv_heads, n), dtype=torch.float32, device=q.device)
    _mass_kernel[(triton.cdiv(n, BLOCK_KEYS), kv_heads)](qk, keys, values, row_pos, lse, out, num_rows, n,
        triton.cdiv(num_rows, BLOCK_ROWS), **consts)  # one compile per question length in row tiles
    return out.sum(0)
