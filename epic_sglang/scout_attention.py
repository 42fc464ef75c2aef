"""querylink's scout: the question's attention over a request's row, and the attention mass
it puts on each key, in one pass per layer (an attention backend of its own).

The scout runs the prompt's computed tokens (the question) through the layers over the
documents' cached KV and scores each key j by sum over (head, scored query i) of
softmax_i(q_i . k)[j] x ||v_j|| under the link mask (j visible to i iff j <= pos_i).
Weighting by the value skips attention sinks (much attention, near-zero values).

On CUDA three Triton kernels per layer:
1. `_gather_kernel`: the row's keys, read in place through its slots and rotated by a table of
   their positions' angles (any RoPE: default, linear, llama3), and its values, copied
   contiguous once (with the values' norms), so the two kernels after it stream plain tiles
   as flash attention does (reading through slots and angles inside their loops, once per row
   tile, they took 17.6 ms of a 32K scout on an H100: BENCHMARKS.md);
2. `_attend_kernel`: per (row tile, kv head, key split) the flash-attention partials (output,
   running max and sum, base 2); the splits merge in torch into the output and each row's
   log-sum-exp;
3. `_mass_kernel` (scored layers): per key tile, exp2(logit - lse) summed over the scored rows
   of its kv head, times the values' norms, added to the running mass.
Nothing of size rows x keys is written, nothing waits on the host, and the key count is read
on the device, so the whole scout can be one CUDA graph (`cuda_graph.ScoutGraphs`). In torch
(CPU, and the definition the kernels are tested against) the same from one fp32 softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.local_attention import online_softmax_step
from epic_sglang.models.rope import Rotary, apply_rotation
from epic_sglang.rotate_copy import rotated

BLOCK_ROWS = 64  # (head, query) rows per tile
BLOCK_KEYS = 64
SPLIT_KEYS = 1024  # keys per `_attend_kernel` program: ~500 programs at 16K keys and 64 queries (8B shape)
MAX_SPLITS = 64
MIN_MASS_ROW_TILES = 64


# Row and key counts are not specialized on (Triton would compile again for each count's
# divisibility by 16): inside SGLang each request brings its own, and no graph capture pays
# the compiles ahead of it.
@triton.jit(do_not_specialize=["max_keys"])
def _gather_kernel(key_buffer, value_buffer, slots, angles, num_keys_at, keys_out, values_out, norms_out, max_keys,
                   KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (key tile, kv head): the row's keys at its slots rotated by their positions' angles
    [cos | sin] (rotate-half layout) and its values, written contiguous (KV_HEADS, max_keys,
    HEAD_DIM) in the buffer's dtype, and the values' norms (KV_HEADS, max_keys) fp32. Tiles
    past the row's key count (a graph's grid covers its most keys) write nothing."""
    block, kv_head = tl.program_id(0), tl.program_id(1)
    num_keys = tl.load(num_keys_at)
    if block * BLOCK_N < num_keys:
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < num_keys
        slot = tl.load(slots + cols, mask=live, other=0).to(tl.int64)
        dims = tl.arange(0, HEAD_DIM)
        src = (slot[:, None] * KV_HEADS + kv_head) * HEAD_DIM
        dst = (kv_head * max_keys + cols[:, None].to(tl.int64)) * HEAD_DIM
        tile = live[:, None] & (dims[None, :] < HEAD_DIM)
        key = rotated(key_buffer + src, angles + cols[:, None].to(tl.int64) * HEAD_DIM, dims[None, :], tile,
                      HEAD_DIM, HEAD_DIM, True)  # the model's rotate-half RoPE over the whole head
        tl.store(keys_out + dst + dims[None, :], key.to(keys_out.dtype.element_ty), mask=tile)
        v = tl.load(value_buffer + src + dims[None, :], mask=live[:, None], other=0.0)
        tl.store(values_out + dst + dims[None, :], v, mask=live[:, None])
        v = v.to(tl.float32)
        tl.store(norms_out + kv_head * max_keys + cols, tl.sqrt(tl.sum(v * v, 1)), mask=live)


@triton.jit
def _tile(buffer, kv_head, cols, live, max_keys, HEAD_DIM: tl.constexpr):
    """Rows `cols` of `kv_head` in a gathered (KV_HEADS, max_keys, HEAD_DIM) buffer."""
    dims = tl.arange(0, HEAD_DIM)
    at = (kv_head * max_keys + cols[:, None].to(tl.int64)) * HEAD_DIM + dims[None, :]
    return tl.load(buffer + at, mask=live[:, None], other=0.0)


@triton.jit(do_not_specialize=["num_rows", "max_keys"])
def _attend_kernel(q, keys, values, row_pos, num_keys_at, o_out, m_out, l_out, num_rows, max_keys,
                   SPLIT: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """q: (KV_HEADS, num_rows, HEAD_DIM) rotated, pre-scaled by log2(e)/sqrt(d); keys, values:
    gathered by `_gather_kernel`; row_pos: (num_rows,) each row's query position (-1: a padding
    row, sees nothing). Writes this program's key split's partials: o_out (splits, KV_HEADS,
    num_rows, HEAD_DIM) un-normalized fp32, m_out and l_out (splits, KV_HEADS, num_rows):
    running max and sum of exp2."""
    block, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    live_rows = rows < num_rows
    pos = tl.load(row_pos + rows, mask=live_rows, other=-1)
    qt = _tile(q, kv_head, rows, live_rows, num_rows, HEAD_DIM)
    num_keys = tl.load(num_keys_at)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    start = split * SPLIT
    if start < num_keys:  # a graph's grid covers its most keys; splits past this row's end only write zeros
        for offset in range(0, SPLIT, BLOCK_N):  # constant trip counts: the interpreter's rule
            cols = start + offset + tl.arange(0, BLOCK_N)
            live_cols = cols < num_keys
            s = tl.dot(qt, tl.trans(_tile(keys, kv_head, cols, live_cols, max_keys, HEAD_DIM)), input_precision=PRECISION)
            s = tl.where(live_cols[None, :] & (cols[None, :] <= pos[:, None]), s, float("-inf"))
            v = _tile(values, kv_head, cols, live_cols, max_keys, HEAD_DIM)
            m, l, acc = online_softmax_step(m, l, acc, s, v, PRECISION)
    at = (split * KV_HEADS + kv_head) * num_rows + rows
    tl.store(m_out + at, m, mask=live_rows)
    tl.store(l_out + at, l, mask=live_rows)
    tl.store(o_out + at[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], acc, mask=live_rows[:, None])


@triton.jit(do_not_specialize=["num_rows", "max_keys"])
def _mass_kernel(q, keys, norms, row_pos, row_weight, lse, num_keys_at, mass, num_rows, max_keys,
                 MAX_ROW_TILES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """mass (KV_HEADS, max_keys) += per key, sum over its kv head's rows of row_weight x
    exp2(logit - lse), times the norm of its value. MAX_ROW_TILES: a bound on the row tiles
    (`mass_row_tiles`), so one compile serves every question length (inside SGLang no graph
    capture pays a compile ahead of the first request; the interpreter needs constant trip
    counts); the tiles past the rows are skipped."""
    block, kv_head = tl.program_id(0), tl.program_id(1)
    num_keys = tl.load(num_keys_at)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    live_cols = cols < num_keys
    if block * BLOCK_N < num_keys:
        kt = tl.trans(_tile(keys, kv_head, cols, live_cols, max_keys, HEAD_DIM))
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for tile in range(MAX_ROW_TILES):
            if tile * BLOCK_M < num_rows:
                rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                live_rows = rows < num_rows
                pos = tl.load(row_pos + rows, mask=live_rows, other=-1)
                weight = tl.load(row_weight + rows, mask=live_rows, other=0.0)
                row_lse = tl.load(lse + kv_head * num_rows + rows, mask=live_rows, other=0.0)
                logits = tl.dot(_tile(q, kv_head, rows, live_rows, num_rows, HEAD_DIM), kt, input_precision=PRECISION)
                p = tl.exp2(logits - row_lse[:, None]) * weight[:, None]
                acc += tl.sum(tl.where(live_cols[None, :] & (cols[None, :] <= pos[:, None]), p, 0.0), 0)
        norm = tl.load(norms + kv_head * max_keys + cols, mask=live_cols, other=0.0)
        at = mass + kv_head * max_keys + cols
        tl.store(at, tl.load(at, mask=live_cols, other=0.0) + acc * norm, mask=live_cols)


def mass_row_tiles(row_tiles: int) -> int:
    """`_mass_kernel`'s loop bound: 64 tiles (4,096 rows, e.g. 1,024 question tokens x 4
    heads a kv head) unless more, then the next power of two."""
    return max(MIN_MASS_ROW_TILES, triton.next_power_of_2(row_tiles))


def scored_layers(num_layers: int, stride: int) -> set[int]:
    """The layers a scout of this stride scores: 0, stride, 2 x stride, ..."""
    return set(range(0, num_layers, stride))


@dataclass
class ScoutSeq:
    """One sequence of the scout: which rows of the batch it is, where they sit, which of
    them are scored, and its row of the pool. Its tensors may be a CUDA graph's static
    buffers (then `max_keys` bounds what `num_keys` may hold)."""
    q_start: int
    q_end: int
    positions: torch.Tensor  # (nq,) int64 query positions (-1: padding)
    weights: torch.Tensor  # (nq,) fp32: 1 for the scored queries (the question), else 0
    q_rope: tuple[torch.Tensor, torch.Tensor] | None  # (nq, head_dim) fp32 cos, sin of the positions (None: rotated already)
    slots: torch.Tensor  # (>= num keys,) int64: the row, slots of positions 0, 1, ...
    key_angles: torch.Tensor  # (>= num keys, head_dim) fp32 [cos | sin] of positions 0, 1, ... (Rotary.angles)
    num_keys: torch.Tensor  # (1,) int32, on the device
    max_keys: int
    mass: torch.Tensor  # (kv heads, max_keys) fp32, accumulated over the scored layers

    @classmethod
    def build(cls, q_start: int, positions: list[int], scored: list[bool], row: torch.Tensor, kv_heads: int,
              rotary: Rotary) -> "ScoutSeq":
        device, n = row.device, row.numel()
        pos = torch.tensor(positions)  # tables indexed from the host: no wait on the device
        return cls(q_start, q_start + len(positions), pos.to(device),
                   torch.tensor(scored, dtype=torch.float32, device=device),
                   rotary.cos_sin(pos, torch.float32), row, rotary.angles(torch.arange(n)),
                   torch.tensor([n], dtype=torch.int32, device=device), n,
                   torch.zeros(kv_heads, n, dtype=torch.float32, device=device))


class ScoutAttention:
    """The scout's attention backend (`forward` as the others'): each sequence's output, and
    its mass accumulated over `scored_layers`. Nothing to plan. `reference`: the torch definition
    (CPU, and beside the engine's torch reference backend), else the Triton kernels."""

    def __init__(self, seqs: list[ScoutSeq], scored_layers: set[int], reference: bool = False):
        self.seqs, self.scored_layers, self.reference = seqs, scored_layers, reference

    def masses(self) -> list[torch.Tensor]:
        """Per sequence, (max_keys,) fp32: its mass, summed over kv heads."""
        return [s.mass.sum(0) for s in self.seqs]

    def forward(self, q: torch.Tensor, layer: int, pool: KVPool, batch: ForwardBatch) -> torch.Tensor:
        k, v = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
        score = layer in self.scored_layers
        out = torch.empty_like(q)
        for s in self.seqs:
            rows = slice(s.q_start, s.q_end)
            layer_fn = scout_layer_torch if self.reference or not q.is_cuda else scout_layer_triton
            out[rows] = layer_fn(apply_rotation(q[rows], *s.q_rope), k, v, s, score)
        return out.reshape(q.shape[0], -1)


def scout_layer_torch(q: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor, s: ScoutSeq,
                      score: bool) -> torch.Tensor:
    """The definition: q (nq, heads, dim) rotated; attention in fp32 under the link mask over
    the row's keys (rotated here); adds the mass to `s.mass` if `score`. Returns the output
    (nq, heads, dim) in q's dtype."""
    n = int(s.num_keys)
    keys, values = key_buffer[s.slots[:n]].float(), value_buffer[s.slots[:n]].float()
    _, kv_heads, dim = keys.shape
    half = dim // 2
    cos, sin = s.key_angles[:n, :half], s.key_angles[:n, half:]
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    keys = apply_rotation(keys, cos, sin)
    nq, heads = q.shape[:2]
    qg = q.float().view(nq, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)  # (kv, group, nq, d)
    logits = torch.matmul(qg * dim ** -0.5, keys.permute(1, 2, 0).unsqueeze(1))  # (kv, group, nq, n)
    logits.masked_fill_(torch.arange(n, device=q.device)[None, :] > s.positions[:, None], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # padding rows see nothing: zeros
    if score:
        s.mass[:, :n] += (probs * s.weights[:, None]).sum((1, 2)) * values.norm(dim=-1).T
    out = torch.matmul(probs, values.permute(1, 0, 2).unsqueeze(1))  # (kv, group, nq, d)
    return out.permute(2, 0, 1, 3).reshape(nq, heads, dim).to(q.dtype)


def scout_layer_triton(q: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor, s: ScoutSeq,
                       score: bool, split: int | None = None) -> torch.Tensor:
    """`scout_layer_torch` in three Triton kernels (and a few torch ops to merge the key splits):
    no host sync, shapes fixed by `s.max_keys` (graph-capturable).
    `split`: keys per attention program; by default SPLIT_KEYS, more past 64 splits (their
    partial outputs are splits x rows x head_dim in fp32)."""
    split = split or max(SPLIT_KEYS, triton.cdiv(s.max_keys, MAX_SPLITS * BLOCK_KEYS) * BLOCK_KEYS)
    if split % BLOCK_KEYS:
        raise ValueError(f"split must be a multiple of {BLOCK_KEYS}, got {split}")
    (nq, heads, dim), kv_heads = q.shape, key_buffer.shape[1]
    group, num_rows = heads // kv_heads, heads // kv_heads * nq
    # rows of kv head h: its query heads' queries, head-major (row g * nq + i: head h*group + g, query i)
    qk = (q.float() * (math.log2(math.e) / math.sqrt(dim))).to(key_buffer.dtype)
    qk = qk.view(nq, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, num_rows, dim).contiguous()
    row_pos, row_weight = s.positions.repeat(group).contiguous(), s.weights.repeat(group).contiguous()
    splits = triton.cdiv(s.max_keys, split)
    m = torch.empty((splits, kv_heads, num_rows), dtype=torch.float32, device=q.device)
    l, o = torch.empty_like(m), torch.empty((splits, kv_heads, num_rows, dim), dtype=torch.float32, device=q.device)
    consts = dict(KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS,
                  PRECISION="ieee" if key_buffer.dtype == torch.float32 else "tf32")  # fp32 (tests) exactly
    row_tiles = triton.cdiv(num_rows, BLOCK_ROWS)
    # the row's keys rotated and its values, contiguous: the kernels below stream them as plain
    # flash attention does (no slot lookups, no angles in their loops)
    keys = torch.empty((kv_heads, s.max_keys, dim), dtype=key_buffer.dtype, device=q.device)
    values, norms = torch.empty_like(keys), torch.empty((kv_heads, s.max_keys), dtype=torch.float32, device=q.device)
    _gather_kernel[(triton.cdiv(s.max_keys, BLOCK_KEYS), kv_heads)](
        key_buffer, value_buffer, s.slots, s.key_angles, s.num_keys, keys, values, norms, s.max_keys,
        KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_N=BLOCK_KEYS)
    _attend_kernel[(row_tiles, kv_heads, splits)](qk, keys, values, row_pos, s.num_keys, o, m, l, num_rows, s.max_keys,
                                                  split, **consts, num_warps=8 if dim > 64 else 4)  # a 64 x 128 fp32 accumulator
    top = m.max(0).values
    top = torch.where(top == float("-inf"), 0.0, top)  # padding rows: every split empty
    w = torch.exp2(m - top)
    total = (l * w).sum(0)
    out = (o * w[..., None]).sum(0) / torch.where(total == 0, 1.0, total)[..., None]
    if score:
        lse = (top + torch.log2(total)).contiguous()
        _mass_kernel[(triton.cdiv(s.max_keys, BLOCK_KEYS), kv_heads)](
            qk, keys, norms, row_pos, row_weight, lse, s.num_keys, s.mass, num_rows, s.max_keys,
            MAX_ROW_TILES=mass_row_tiles(row_tiles), HEAD_DIM=dim, BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS, PRECISION=consts["PRECISION"])
    return out.view(kv_heads, group, nq, dim).permute(2, 0, 1, 3).reshape(nq, heads, dim).to(q.dtype)
