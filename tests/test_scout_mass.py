"""querylink's Triton scoring kernels against the torch definition (`linker.attention_mass`).
On CPU the kernels run in Triton's interpreter, in a subprocess (see `triton_interpreter`)."""
from __future__ import annotations

import pytest
import torch

from epic_sglang.linker import ScoutQueries, attention_mass
from epic_sglang.models.rope import apply_rotation
from triton_interpreter import check_kernel_in_interpreter

KV_HEADS, GROUP, HEAD_DIM, KEYS, POOL = 2, 3, 64, 300, 400


def _rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (tokens, head_dim) of plain RoPE, rotate-half layout."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()


def check_kernel(device: str) -> None:
    """Scattered slots, keys past some queries' positions (masked), row and key counts off
    the tiles, the log-sum-exp split across programs or not: the kernels' mass is the
    torch definition's (fp32: to 1e-4; bf16, on the GPU: within the logits' rounding; the
    interpreter's dot is not bf16's)."""
    from epic_sglang.scout_mass import attention_mass_triton

    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([40, 150, 250, 270, 275, 276, 278, 280])
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2))[:2 if device == "cuda" else 1]:
        for split in (64, 2048):
            keys = (torch.randn(POOL, KV_HEADS, HEAD_DIM, generator=gen) * 2).to(dtype)
            values = torch.randn(POOL, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
            q = (torch.randn(len(positions), KV_HEADS * GROUP, HEAD_DIM, generator=gen) * 2).to(dtype)
            slots = torch.randperm(POOL, generator=gen)[:KEYS]
            k_cos, k_sin = _rope(torch.arange(KEYS))
            sq = ScoutQueries(torch.arange(len(positions)), positions, _rope(positions), None, (k_cos, k_sin),
                              int(positions.min()), torch.arange(int(positions.min()), KEYS)[None, :] > positions[:, None])
            expected = attention_mass(q.float(), keys.float(), values.float(), slots, sq)
            angles = torch.cat([k_cos[:, :HEAD_DIM // 2], k_sin[:, :HEAD_DIM // 2]], -1)
            rotated_q = apply_rotation(q.to(device), *(t.to(device) for t in _rope(positions)))
            got = attention_mass_triton(rotated_q, positions.to(device), keys.to(device), values.to(device),
                                        slots.to(device), angles.to(device), split_keys=split).cpu()
            assert got.shape == (KEYS,)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))
            # the mask: a key after every query's position carries nothing
            assert float(got[positions.max() + 1:].abs().sum()) == 0.0


def test_scout_mass_kernels_in_the_interpreter():
    check_kernel_in_interpreter("test_scout_mass")


@pytest.mark.gpu
def test_scout_mass_kernels_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    check_kernel("cuda")
