"""The cascade's merge kernel: attention over a row's keys computed in parts (a local part in
place, any number of other parts anywhere in a parts buffer) and merged equals attention
over all of them. On CPU the kernel runs in Triton's interpreter, in a subprocess."""
from __future__ import annotations

import itertools

import pytest
import torch

from triton_interpreter import check_kernel_in_interpreter


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, dim) query over (keys, heads, dim): output and base-2 log-sum-exp per head, as FlashInfer returns."""
    scores = torch.einsum("hd,khd->hk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v), torch.logsumexp(scores, -1) / torch.log(
        torch.tensor(2.0))


def check_kernel(device: str) -> None:
    from epic_sglang.merge_states import MergeIndex, merge_into

    g = torch.Generator().manual_seed(0)
    heads, dim, rows = 4, 96, 7
    q = torch.randn(rows, heads, dim, generator=g)
    keys = [torch.randint(3, 40, (), generator=g).item() for _ in range(rows)]
    kv = [(torch.randn(n, heads, dim, generator=g) * 2, torch.randn(n, heads, dim, generator=g)) for n in keys]
    # rows 1, 3, 4, 6 get parts (1 to 3 chunks of their keys; row 6 37, more than the kernel loads
    # at once), listed as a cascade lists them: chunk-major within a group of rows; the local part
    # is what remains of each row's keys
    keys[6] = 80
    kv[6] = (torch.randn(80, heads, dim, generator=g) * 2, torch.randn(80, heads, dim, generator=g))
    cuts = {1: [20], 3: [10, 20], 4: [10, 20], 6: list(range(1, 38))}  # in 40ths of a row's keys
    spans, part_out, part_lse, local_from = [], [], [], {}
    for group in ([1], [3, 4], [6]):
        for c in range(len(cuts[group[0]])):
            spans.append((group[0], group[-1] + 1))
            for r in range(group[0], group[-1] + 1):
                n = keys[r]
                bounds = [0] + [n * x // 40 for x in cuts[r]]
                o, s = partial_attention(q[r], kv[r][0][bounds[c]:bounds[c + 1]], kv[r][1][bounds[c]:bounds[c + 1]])
                part_out.append(o)
                part_lse.append(s)
                local_from[r] = bounds[-1]
    out, lse = map(torch.stack, zip(*[partial_attention(q[r], kv[r][0][local_from.get(r, 0):],
                                                           kv[r][1][local_from.get(r, 0):]) for r in range(rows)]))
    expected = torch.stack([partial_attention(q[r], *kv[r])[0] for r in range(rows)])
    # the default tuning (16 parts a step, one warp), row 6's 37 parts in steps of 4, and a step's
    # parts spread over 4 warps (tuning changes no result)
    for (dtype, tol), (chunk, warps) in itertools.product(((torch.float32, 1e-5), (torch.bfloat16, 2e-2)),
                                                          ((16, 1), (4, 1), (16, 4))):
        got, got_lse = out.to(device, dtype, copy=True), lse.to(device, copy=True)
        index = MergeIndex.build(spans, torch.device(device))
        assert index.query_rows.tolist() == [1, 3, 4, 3, 4] + [6] * 37 and index.most_parts == 37
        merge_into(got, got_lse, torch.stack(part_out).to(device, dtype), torch.stack(part_lse).to(device), index,
                   chunk=chunk, num_warps=warps)
        torch.testing.assert_close(got.float().cpu(), expected, atol=tol, rtol=tol)
        assert torch.equal(got[[0, 2, 5]].cpu(), out[[0, 2, 5]].to(dtype))  # rows without parts: untouched
        full_lse = torch.stack([partial_attention(q[r], *kv[r])[1] for r in range(rows)])
        torch.testing.assert_close(got_lse.cpu(), full_lse, atol=1e-4, rtol=1e-4)


def test_merged_parts_equal_attention_over_all_keys_in_the_interpreter():
    check_kernel_in_interpreter("test_merge_states")


@pytest.mark.gpu
def test_merged_parts_equal_attention_over_all_keys_on_gpu():
    check_kernel("cuda")


@pytest.mark.gpu
def test_merge_reads_log_sum_exps_as_flashinfer_writes_them():
    """Two states merged by the kernel = flashinfer.merge_state (pins the log-sum-exp base)."""
    flashinfer = pytest.importorskip("flashinfer")
    from epic_sglang.merge_states import MergeIndex, merge_into

    g = torch.Generator(device="cuda").manual_seed(0)
    va, vb = (torch.randn(64, 8, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    sa, sb = (torch.randn(64, 8, device="cuda", generator=g) * 3 for _ in range(2))
    expected, expected_lse = flashinfer.merge_state(vb, sb, va, sa)
    out, lse = va.clone(), sa.clone()
    merge_into(out, lse, vb, sb, MergeIndex.build([(0, 64)], torch.device("cuda")))
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
