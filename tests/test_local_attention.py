"""The cascade's position-masked local kernel against its definition (softmax over the keys
from the group's first key to the query's own position). On CPU in Triton's interpreter."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epic_sglang.link_plan import link_entries, query_runs
from triton_interpreter import check_kernel_in_interpreter

KV_HEADS, HEAD_DIM = 2, 64


def check_kernel(device: str) -> None:
    """Two sequences of scattered queries (single tokens, short runs), cut into cascade groups
    by `link_entries`, their keys gathered at an offset of the scratch; GQA groups of 3 (not a
    power of two) and 4; tiles cut inside groups: each row's output and log-sum-exp (base 2)
    are the definition's (fp32: 1e-4; bf16 on the GPU: its rounding)."""
    from epic_sglang.local_attention import LocalTiles, local_attention, local_groups

    gen = torch.Generator().manual_seed(0)
    for group_size in (3, 4):
        heads = KV_HEADS * group_size
        seqs = [sorted(set(torch.randint(0, 700, (90,), generator=gen).tolist())) + [700, 701, 702],
                list(range(5, 9)) + [40, 41, 100, 300, 301, 302]]
        lens, base, rows, groups, positions = [703, 303], [0, 720], 0, [], []
        for pos, n, b in zip(seqs, lens, base):
            runs = query_runs(pos)
            _, local = link_entries(runs, 16, 24)
            for q0, q1, k0 in local_groups(local):
                groups.append((rows + q0, rows + q1, b + k0, k0))
            positions += pos
            rows += len(pos)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2))[:2 if device == "cuda" else 1]:
            q = torch.randn(rows, heads, HEAD_DIM, generator=gen).to(dtype)
            k = torch.randn(1100, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
            v = torch.randn(1100, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
            expected, expected_lse = torch.zeros(rows, heads, HEAD_DIM), torch.zeros(rows, heads)
            for q0, q1, key_row, key_pos in groups:
                for r in range(q0, q1):
                    keys = slice(key_row, key_row + positions[r] - key_pos + 1)
                    kk = k[keys].float().repeat_interleave(group_size, 1)  # (n, heads, d)
                    logits = torch.einsum("hd,nhd->hn", q[r].float(), kk) / math.sqrt(HEAD_DIM)
                    expected[r] = torch.einsum("hn,nhd->hd", torch.softmax(logits, -1),
                                               v[keys].float().repeat_interleave(group_size, 1))
                    expected_lse[r] = torch.logsumexp(logits, -1) / math.log(2)
            tiles = LocalTiles.build(groups, np.array(positions), group_size, torch.device(device))
            out, lse = local_attention(q.to(device), k.to(device), v.to(device),
                                       torch.tensor(positions, device=device), tiles)
            torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol)
            torch.testing.assert_close(lse.cpu(), expected_lse, rtol=tol, atol=tol)


def test_local_groups_join_a_groups_runs():
    runs = query_runs([0, 1, 2, 10, 20, 21, 30, 50, 51, 52, 53])
    _, local = link_entries(runs, 4, 3)  # groups of >= 3 queries, keys from a 4-key page
    from epic_sglang.local_attention import local_groups

    groups = local_groups(local)
    assert [(q0, q1) for q0, q1, _ in groups] == [(0, 3), (3, 6), (6, 11)]
    assert [k0 for *_, k0 in groups] == [0, 8, 28]  # each group's first run's page


def test_local_kernel_in_the_interpreter():
    check_kernel_in_interpreter("test_local_attention")


@pytest.mark.gpu
def test_local_kernel_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    check_kernel("cuda")
