"""Two Triton kernels: copy KV rows across every layer, rotating the keys on the way; and
gather rows of one buffer rotated (`rotate_rows`: the SGLang plugin's queries of a cached run).

Placing a cached document at a new position is `K[dst] = rotate(K[src], angle)` and
`V[dst] = V[src]` for each of its tokens in every layer. In torch that is about ten
elementwise passes and a dozen launches per layer; here it is one launch for all layers,
one read and one write of each row (memory bound: ~4 KB per token and layer at the 8B
shape). Layers are reached through tables of buffer addresses, so per-layer tensors (SGLang's
pool, the engine's scratch) need no stacking.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def rotated(row, cos_sin, offs, live, HEAD_DIM: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr):
    """The row at `row` (fp32) rotated by its angles [cos | sin] at `cos_sin`; dims past ROT as they are.
    `offs` index the row's elements (heads x HEAD_DIM); pointers and offsets may be tiles (a
    column of rows' pointers against a row of offsets: `scout_attention`'s key tiles)."""
    dim = offs % HEAD_DIM
    half: tl.constexpr = ROT // 2
    if NEOX:  # rotate-half: pairs (i, i + ROT/2)
        partner = tl.where(dim < half, dim + half, dim - half)
        freq = dim % half
        sign = tl.where(dim < half, -1.0, 1.0)
    else:  # interleaved (GPT-J): pairs (2i, 2i + 1)
        partner = dim ^ 1
        freq = dim // 2
        sign = tl.where(dim % 2 == 0, -1.0, 1.0)
    rotated = live & (dim < ROT)
    x = tl.load(row + offs, mask=live).to(tl.float32)
    pair = tl.load(row + offs - dim + partner, mask=rotated, other=0.0).to(tl.float32)
    cos = tl.load(cos_sin + freq, mask=rotated, other=1.0)
    sin = tl.load(cos_sin + half + freq, mask=rotated, other=0.0)
    return x * cos + sign * pair * sin


@triton.jit
def _rotate_copy_kernel(k_src, v_src, k_dst, v_dst,  # int64 address tables, one entry per layer
                        src_rows, dst_rows, cos_sin,  # (n,) (n,) (n, ROT) fp32 as [cos | sin]
                        DTYPE: tl.constexpr, ROW: tl.constexpr, HEAD_DIM: tl.constexpr,
                        ROT: tl.constexpr, NEOX: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    layer = tl.program_id(1)
    ptr = tl.pointer_type(DTYPE)
    src = tl.load(src_rows + token).to(tl.int64) * ROW
    dst = tl.load(dst_rows + token).to(tl.int64) * ROW
    offs = tl.arange(0, BLOCK)
    live = offs < ROW
    key = rotated(tl.load(k_src + layer).to(ptr) + src, cos_sin + token * ROT, offs, live, HEAD_DIM, ROT, NEOX)
    tl.store(tl.load(k_dst + layer).to(ptr) + dst + offs, key.to(DTYPE), mask=live)
    value = tl.load(tl.load(v_src + layer).to(ptr) + src + offs, mask=live)
    tl.store(tl.load(v_dst + layer).to(ptr) + dst + offs, value, mask=live)


@triton.jit
def _rotate_rows_kernel(x, out, rows, cos_sin, ROW: tl.constexpr, HEAD_DIM: tl.constexpr,
                        ROT: tl.constexpr, NEOX: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    live = offs < ROW
    y = rotated(x + tl.load(rows + i).to(tl.int64) * ROW, cos_sin + i * ROT, offs, live, HEAD_DIM, ROT, NEOX)
    tl.store(out + i.to(tl.int64) * ROW + offs, y.to(out.dtype.element_ty), mask=live)


@functools.lru_cache(maxsize=256)
def _device_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    table = torch.tensor(addresses, dtype=torch.int64)
    if device.type == "cuda":  # from pinned memory the upload is queued, not waited for
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def address_table(buffers: list[torch.Tensor]) -> torch.Tensor:
    """int64 addresses of per-layer buffers, on their device, cached by the addresses. A
    table is uploaded from pinned memory without waiting: a blocking upload would stall the
    host on the stream at every launch over fresh buffers (the scout's gathered keys, the
    engine's scratch), as it did the plugin's queries (session 11, BENCHMARKS.md)."""
    return _device_table(tuple(b.data_ptr() for b in buffers), buffers[0].device)


def rotate_copy(k_src: list[torch.Tensor], v_src: list[torch.Tensor], k_dst: list[torch.Tensor],
                v_dst: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor, cos_sin: torch.Tensor,
                is_neox_style: bool = True) -> None:
    """For each layer l and token i: k_dst[l][dst[i]] = rotate(k_src[l][src[i]]) and
    v_dst[l][dst[i]] = v_src[l][src[i]]. Buffers: contiguous (rows, heads, head_dim), one
    dtype. cos_sin: (tokens, rotary_dim) fp32, cos then sin of each token's angles (rotary
    dims past rotary_dim are copied as they are)."""
    first = k_src[0]
    buffers = [*k_src, *v_src, *k_dst, *v_dst]
    if any(not b.is_contiguous() or b.dtype != first.dtype or b.shape[1:] != first.shape[1:] for b in buffers):
        raise ValueError("rotate_copy needs contiguous buffers of one dtype and row shape")
    if first.dtype not in _TL_DTYPES:
        raise ValueError(f"rotate_copy supports {list(_TL_DTYPES)}, not {first.dtype}")
    n, rot = src.numel(), cos_sin.shape[-1]
    if n == 0:
        return
    heads, head_dim = first.shape[1], first.shape[2]
    _rotate_copy_kernel[(n, len(k_src))](
        address_table(k_src), address_table(v_src), address_table(k_dst), address_table(v_dst),
        src, dst, cos_sin.float().contiguous(),
        DTYPE=_TL_DTYPES[first.dtype], ROW=heads * head_dim, HEAD_DIM=head_dim, ROT=rot,
        NEOX=is_neox_style, BLOCK=triton.next_power_of_2(heads * head_dim))


def rotate_rows(x: torch.Tensor, rows: torch.Tensor, cos_sin: torch.Tensor, is_neox_style: bool = True) -> torch.Tensor:
    """out[i] = rotate(x[rows[i]]) by the angles cos_sin[i] (as `rotate_copy`'s): a gathered,
    rotated copy of rows of one buffer (queries), one launch, no address table to upload."""
    if not x.is_contiguous() or x.dtype not in _TL_DTYPES:
        raise ValueError(f"rotate_rows needs a contiguous buffer of {list(_TL_DTYPES)}")
    out = torch.empty((rows.numel(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    if rows.numel():
        row = x[0].numel()
        _rotate_rows_kernel[(rows.numel(),)](x, out, rows, cos_sin.float().contiguous(), ROW=row, HEAD_DIM=x.shape[-1],
                                             ROT=cos_sin.shape[-1], NEOX=is_neox_style,
                                             BLOCK=triton.next_power_of_2(row))
    return out
