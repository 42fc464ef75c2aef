"""One Triton kernel: a cascade group's local keys attended by its scattered queries in one
launch, masked by position.

A cascade gives each group of query runs one bulk entry over the keys before the group,
and the keys from the group's start on to each query's own position ("local"). With
LegoLink's contiguous runs the local part is a few causal entries; querylink's single-token
picks make ~70 one-query runs a group (~560 FA2 entries a layer at 32K: 21.6 ms a link on an
H100, against ~9 for legolink-16's). Here each tile of a group's queries (sorted by position,
packed with their GQA heads) reads the group's gathered keys from its start up to its last
query's position once, and masks key j for query i iff position(j) > position(i): no mask
tensor, no per-run entry. Output and log-sum-exp (base 2, FlashInfer's convention) go to the
cascade's merge with the bulk entries' results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from epic_sglang.link_plan import Entry

BLOCK_ROWS = 64  # (query, head) rows per tile
BLOCK_KEYS = 64


@triton.jit
def online_softmax_step(m, l, acc, s, v, PRECISION: tl.constexpr):
    """One key block of flash attention (base 2): the running max `m`, sum `l` and output `acc`
    of each row updated with the block's logits `s` (-inf: not visible) and values `v`. A row
    that has seen no visible key yet keeps l = acc = 0."""
    new_m = tl.maximum(m, tl.max(s, 1))
    safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha = tl.exp2(m - safe)
    p = tl.exp2(s - safe[:, None])
    return new_m, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)


@triton.jit
def _local_kernel(q, k, v, q_pos, tiles, out, lse, scale, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MAX_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """q, out: (T, HEADS, HEAD_DIM); k, v: gathered (R, KV_HEADS, HEAD_DIM), rotated; q_pos (T,)
    each query's position; tiles (num tiles, 5) int64: first query row, query count, scratch
    row of the first local key, that key's position, the tile's last query position. Rows of
    a tile: head g of the kv head's group and query i at row g * BLOCK_Q + i."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    q_row0 = tl.load(tiles + tile * 5)
    count = tl.load(tiles + tile * 5 + 1)
    key_row0 = tl.load(tiles + tile * 5 + 2)
    key_pos0 = tl.load(tiles + tile * 5 + 3)
    last = tl.load(tiles + tile * 5 + 4)
    r = tl.arange(0, BLOCK_M)
    g, i = r // BLOCK_Q, r % BLOCK_Q
    live = (g < GROUP) & (i < count)
    row = q_row0 + i
    dims = tl.arange(0, HEAD_DIM)
    at = (row * HEADS + kv_head * GROUP + g)[:, None] * HEAD_DIM + dims[None, :]
    qt = tl.load(q + at, mask=live[:, None], other=0.0)
    pos = tl.load(q_pos + row, mask=live, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for b in range(MAX_BLOCKS):  # constant trip count (the interpreter's rule); blocks past the tile skip
        if key_pos0 + b * BLOCK_N <= last:
            cols = b * BLOCK_N + tl.arange(0, BLOCK_N)
            live_cols = key_pos0 + cols <= last
            kv_at = ((key_row0 + cols) * KV_HEADS + kv_head)[:, None] * HEAD_DIM + dims[None, :]
            kt = tl.load(k + kv_at, mask=live_cols[:, None], other=0.0)
            s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale
            s = tl.where((key_pos0 + cols)[None, :] <= pos[:, None], s, float("-inf"))
            vt = tl.load(v + kv_at, mask=live_cols[:, None], other=0.0)
            m, l, acc = online_softmax_step(m, l, acc, s, vt, PRECISION)
    tl.store(out + at, (acc / l[:, None]).to(out.dtype.element_ty), mask=live[:, None])
    tl.store(lse + row * HEADS + kv_head * GROUP + g, m + tl.log2(l), mask=live)


@dataclass
class LocalTiles:
    """The tiles of one forward's local entries, made at plan time (on the host, sent once)."""
    tiles: torch.Tensor  # (num tiles, 5) int64, `_local_kernel`'s layout
    max_blocks: int  # key blocks of the longest tile, rounded up to a power of two (fewer compiles)

    @classmethod
    def build(cls, groups: list[tuple[int, int, int, int]], positions: np.ndarray, group_size: int,
              device: torch.device) -> "LocalTiles":
        """`groups`: (first query row, end query row, scratch row of the first local key, its
        position) of each group of runs; `positions`: every batch row's position (sorted within a
        group). Each group's queries are cut into tiles of as many as fit BLOCK_ROWS with their heads."""
        per_tile = tile_queries(group_size)
        rows = []
        for q0, q1, key_row, key_pos in groups:
            for t in range(q0, q1, per_tile):
                end = min(t + per_tile, q1)
                rows.append((t, end - t, key_row, key_pos, int(positions[end - 1])))
        tiles = np.array(rows, dtype=np.int64).reshape(-1, 5)
        span = int((tiles[:, 4] - tiles[:, 3]).max()) + 1 if len(rows) else 1
        return cls(torch.from_numpy(tiles).to(device, non_blocking=True),
                   triton.next_power_of_2(triton.cdiv(span, BLOCK_KEYS)))


def tile_queries(group_size: int) -> int:
    """Queries per tile: their rows (each with its kv head's `group_size` heads) fill BLOCK_ROWS."""
    return max(1, BLOCK_ROWS // triton.next_power_of_2(group_size))


def local_groups(entries: list[Entry]) -> list[tuple[int, int, int]]:
    """A sequence's cascade local entries (`link_plan.link_entries`: the runs of a group share
    their first key) as groups: (first query row, end query row, first key)."""
    groups: list[tuple[int, int, int]] = []
    for q0, q1, k0, _ in entries:
        if groups and groups[-1][2] == k0 and groups[-1][1] == q0:
            groups[-1] = (groups[-1][0], q1, k0)
        else:
            groups.append((q0, q1, k0))
    return groups


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    local: LocalTiles) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, heads, dim), lse (T, heads) fp32, base 2) of every tiled query row over its local
    keys; q (T, heads, dim) rotated; k, v gathered (R, kv heads, dim), rotated."""
    (rows, heads, dim), kv_heads = q.shape, k.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    lse = torch.empty((rows, heads), dtype=torch.float32, device=q.device)
    _local_kernel[(local.tiles.shape[0], kv_heads)](
        q, k, v, positions, local.tiles, out, lse, math.log2(math.e) / math.sqrt(dim), HEADS=heads,
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=dim, BLOCK_Q=tile_queries(group),
        BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS, MAX_BLOCKS=local.max_blocks,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8 if dim > 64 else 4)
    return out, lse
