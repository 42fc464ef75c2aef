"""One Triton kernel: merge partial attention results into the rows they belong to.

A cascade attends a query's keys in parts: its local entry, and the keys before its group
split into chunks (FA3 gives one query tile's keys to one CTA whole, so a long group would
be the critical path). Each part returns its output and log-sum-exp (base 2, FlashInfer's).
The merge is one pass per (row, head) over that row's parts, written into the local result
in place: one launch per layer however many parts a row has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from epic_sglang.link_plan import concat_ranges


@triton.jit
def _merge_kernel(out, out_lse, parts, parts_lse, rows, part_ptr, part_idx,
                  HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MAX_PARTS: tl.constexpr,
                  CHUNK: tl.constexpr):
    i = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(rows + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    live = offs < HEAD_DIM
    at = (row * HEADS + head) * HEAD_DIM
    acc = tl.load(out + at + offs, mask=live, other=0.0).to(tl.float32)
    m = tl.load(out_lse + row * HEADS + head)
    total = tl.full((), 1.0, tl.float32)  # the parts' summed weight, relative to 2^m
    first, end = tl.load(part_ptr + i), tl.load(part_ptr + i + 1)
    # CHUNK parts per step, loaded together: a row's parts are a few dependent rounds, not one
    # round each (a decode row over 64 documents was 64 serial loads: 16 us a layer); a
    # constant trip count (loop bounds loaded from memory are not allowed in the interpreter)
    for c in range(0, MAX_PARTS, CHUNK):
        j = first + c + tl.arange(0, CHUNK)
        has = j < end
        p = tl.load(part_idx + j, mask=has, other=0).to(tl.int64)
        lse = tl.load(parts_lse + p * HEADS + head, mask=has, other=float("-inf"))
        value = tl.load(parts + (p * HEADS + head)[:, None] * HEAD_DIM + offs[None, :],
                        mask=has[:, None] & live[None, :], other=0.0).to(tl.float32)
        new_m = tl.maximum(m, tl.max(lse, 0))
        keep, weight = tl.exp2(m - new_m), tl.exp2(lse - new_m)
        acc = acc * keep + tl.sum(value * weight[:, None], 0)
        total = total * keep + tl.sum(weight, 0)
        m = new_m
    tl.store(out + at + offs, (acc / total).to(out.dtype.element_ty), mask=live)
    tl.store(out_lse + row * HEADS + head, m + tl.log2(total))


@dataclass
class MergeIndex:
    """Where each row's parts lie: part p (a row of the parts' output) belongs to row
    `query_rows[p]`; `rows` are the distinct rows and `part_ptr` / `part_idx` list each one's parts."""
    query_rows: torch.Tensor  # int64: the parts' query rows, to gather the queries they attend with
    rows: torch.Tensor  # int32
    part_ptr: torch.Tensor  # int32, len(rows) + 1
    part_idx: torch.Tensor  # int32
    most_parts: int  # the most parts any row has

    @classmethod
    def build(cls, spans: list[tuple[int, int]], device: torch.device) -> MergeIndex:
        """`spans`: the query rows [a, b) of each part entry, in the parts' output order."""
        arrays = merge_arrays(spans)
        return cls(*(torch.from_numpy(a).to(device, non_blocking=True) for a in arrays[:4]), most_parts=arrays[4])


def merge_arrays(spans: list[tuple[int, int]], num_rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """MergeIndex's host arrays (query_rows int64, rows / part_ptr / part_idx int32) and its
    most parts per row, for the parts' query-row `spans`. `num_rows`: every row 0..num_rows-1
    is listed, those without parts with none (a fixed shape, as a CUDA graph needs)."""
    targets = concat_ranges([a for a, _ in spans], [b for _, b in spans])  # every span's rows, back to back
    order = np.argsort(targets, kind="stable")  # each row's parts in output order
    if num_rows is None:
        rows, counts = np.unique(targets, return_counts=True)
    else:
        rows, counts = np.arange(num_rows), np.bincount(targets, minlength=num_rows)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    return (targets, rows.astype(np.int32), ptr.astype(np.int32), order.astype(np.int32),
            int(counts.max()) if counts.size else 0)


def merge_into(out: torch.Tensor, out_lse: torch.Tensor, parts: torch.Tensor, parts_lse: torch.Tensor,
               index: MergeIndex, chunk: int = 16, num_warps: int = 1) -> None:
    """out[r], out_lse[r] (r in index.rows) become the merge of themselves and their parts.
    out, parts: contiguous (rows, heads, head_dim); out_lse, parts_lse: fp32 (rows, heads).
    `chunk`: parts loaded per step; `num_warps`: per (row, head) program. Tuning only
    (`benchmarks/gpu_plugin_decode.py --part link` times them): the result is the same."""
    if not (out.is_contiguous() and parts.is_contiguous() and out_lse.is_contiguous() and parts_lse.is_contiguous()):
        raise ValueError("merge_into needs contiguous outputs and log-sum-exps")
    heads, head_dim = out.shape[1], out.shape[2]
    parts_bound = triton.next_power_of_2(max(index.most_parts, 1))
    if index.rows.numel():
        _merge_kernel[(index.rows.numel(), heads)](out, out_lse, parts, parts_lse, index.rows, index.part_ptr,
                                                   index.part_idx, HEADS=heads, HEAD_DIM=head_dim,
                                                   BLOCK=triton.next_power_of_2(head_dim),
                                                   MAX_PARTS=parts_bound, CHUNK=min(parts_bound, chunk),
                                                   num_warps=num_warps)
