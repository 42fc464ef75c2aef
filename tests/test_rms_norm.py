"""The Triton RMSNorm (GPU path of the decoder's RMSNorm) against the decoder's torch
arithmetic, which the CPU path runs and the Hugging Face parity tests pin down. On CPU the
kernel runs in Triton's interpreter, in a subprocess (the interpreter is chosen when the
kernel is defined)."""
from __future__ import annotations

import pytest
import torch

from epic_sglang.models.decoder import RMSNorm
from triton_interpreter import check_kernel_in_interpreter


def check_kernel(device: str) -> None:
    """Hidden sizes of the bundled models (576, 896) and a head dim (qk-norm, 3-D input);
    fp32 as torch up to summation order; bf16 within one rounding step of the output (the
    interpreter truncates where CUDA rounds)."""
    from epic_sglang.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 576), (2, 896), (2, 2, 128), (0, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            norm = RMSNorm(shape[-1], 1e-6)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(shape[-1], generator=gen) * 0.5 + 1)
            norm = norm.to(dtype)
            x = (torch.randn(shape, generator=gen) * 4).to(dtype)
            expected = norm(x)  # torch path (CPU)
            got = rms_norm(x.to(device), norm.weight.to(device), norm.eps).cpu()
            assert got.dtype == expected.dtype and got.shape == expected.shape
            if dtype == torch.float32:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            else:
                step = expected.float().abs().clamp(min=1e-2) * 2 ** -6
                assert ((got.float() - expected.float()).abs() <= step).all(), shape


def test_kernel_matches_the_torch_rmsnorm_in_the_interpreter():
    check_kernel_in_interpreter("test_rms_norm")


@pytest.mark.gpu
def test_kernel_matches_the_torch_rmsnorm_on_gpu():
    check_kernel("cuda")
