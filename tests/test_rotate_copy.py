"""The Triton rotate-copy kernel against the plugin's torch rotation (SGLang's
`apply_rotary_emb`). On CPU the kernel runs in Triton's interpreter, in a subprocess
because the interpreter is chosen when the kernel is defined."""
from __future__ import annotations

import pytest
import torch

from epic_sglang.rotate_copy import rotate_copy, rotate_rows
from epic_sglang.sglang_plugin.rotary import RopeTable
from triton_interpreter import check_kernel_in_interpreter

LAYERS, HEADS, HEAD_DIM, ROWS = 3, 2, 64, 40


def check_kernel(device: str) -> None:
    """Every (style, rotary dim, dtype, in place or across buffers): copied rows are the
    torch rotation (fp32 up to fused multiply-adds; bf16 within one rounding step, as
    Triton's interpreter truncates where CUDA rounds), values copied exactly, other rows
    untouched."""
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.tensor([1, 5, 7, 9, 33]), torch.tensor([20, 21, 30, 39, 2])
    for neox in (True, False):
        for rot in (HEAD_DIM, HEAD_DIM // 2):
            for dtype in (torch.float32, torch.bfloat16):
                for in_place in (True, False):
                    def buffers():
                        return [(torch.randn(ROWS, HEADS, HEAD_DIM, generator=gen) * 3).to(dtype).to(device)
                                for _ in range(LAYERS)]
                    k_src, v_src = buffers(), buffers()
                    k_dst, v_dst = (k_src, v_src) if in_place else (buffers(), buffers())
                    before_k, before_v = [k.clone() for k in k_dst], [v.clone() for v in v_dst]
                    angles = torch.rand(len(src), rot // 2, generator=gen) * 6.3
                    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], -1).to(device), rot, neox)
                    rows = torch.arange(len(src), device=device)
                    cos, sin = rope.angles(rows)
                    expected_k = [rope.rotate(k[src.to(device)], cos, sin) for k in k_src]
                    expected_v = [v[src.to(device)].clone() for v in v_src]
                    rotate_copy(k_src, v_src, k_dst, v_dst, src.to(device), dst.to(device),
                                torch.cat([cos, sin], -1), neox)
                    untouched = torch.ones(ROWS, dtype=torch.bool)
                    untouched[dst] = False
                    for layer in range(LAYERS):
                        got = k_dst[layer][dst.to(device)]
                        if dtype == torch.float32:
                            torch.testing.assert_close(got, expected_k[layer], rtol=1e-6, atol=1e-5)
                        else:
                            step = expected_k[layer].float().abs().clamp(min=1e-3) * 2 ** -7
                            assert ((got.float() - expected_k[layer].float()).abs() <= step).all(), (neox, rot)
                        assert torch.equal(v_dst[layer][dst.to(device)], expected_v[layer])
                        assert torch.equal(k_dst[layer][untouched.to(device)], before_k[layer][untouched.to(device)])
                        assert torch.equal(v_dst[layer][untouched.to(device)], before_v[layer][untouched.to(device)])
                    if not in_place:  # gathered rows of one buffer (queries): the same rotation
                        assert torch.equal(rotate_rows(k_src[0], src.to(device), torch.cat([cos, sin], -1), neox),
                                           k_dst[0][dst.to(device)])


def test_kernel_matches_torch_rotation_in_the_interpreter():
    check_kernel_in_interpreter("test_rotate_copy")


@pytest.mark.gpu
def test_kernel_matches_torch_rotation_on_gpu():
    check_kernel("cuda")


def test_refuses_mixed_buffers_before_launching():
    k = [torch.zeros(4, 2, 8)]
    half = [torch.zeros(4, 2, 8, dtype=torch.bfloat16)]
    rows, cos_sin = torch.tensor([0]), torch.zeros(1, 8)
    with pytest.raises(ValueError, match="one dtype"):
        rotate_copy(k, half, k, k, rows, rows, cos_sin)
    with pytest.raises(ValueError, match="contiguous"):
        rotate_copy([torch.zeros(2, 4, 8).transpose(0, 1)], k, k, k, rows, rows, cos_sin)
    with pytest.raises(ValueError, match="supports"):
        ints = [torch.zeros(4, 2, 8, dtype=torch.int8)]
        rotate_copy(ints, ints, ints, ints, rows, rows, cos_sin)
