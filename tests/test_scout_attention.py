"""querylink's scout: its Triton kernels against the torch definition (`scout_layer_torch`).
On CPU the kernels run in Triton's interpreter, in a subprocess (see `triton_interpreter`)."""
from __future__ import annotations

import pytest
import torch

from epic_sglang.models.rope import apply_rotation
from epic_sglang.scout_attention import ScoutSeq, scout_layer_torch
from triton_interpreter import check_kernel_in_interpreter

KV_HEADS, GROUP, HEAD_DIM, KEYS, POOL = 2, 3, 64, 300, 400


def _rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (tokens, head_dim) of plain RoPE, rotate-half layout."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = positions.clamp(min=0).float()[:, None] * inv_freq[None, :]
    return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()


def _seq(positions: list[int], scored: list[bool], slots: torch.Tensor, num_keys: int, device: str) -> ScoutSeq:
    """A sequence whose buffers hold `slots` (its row; past `num_keys`, a graph's stale
    entries) and the angles of as many positions."""
    pos = torch.tensor(positions)
    cos, sin = _rope(torch.arange(slots.numel()))
    angles = torch.cat([cos[:, :HEAD_DIM // 2], sin[:, :HEAD_DIM // 2]], -1)
    return ScoutSeq(0, len(positions), pos.to(device), torch.tensor(scored, dtype=torch.float32, device=device),
                    tuple(t.to(device) for t in _rope(pos)), slots.to(device), angles.to(device),
                    torch.tensor([num_keys], dtype=torch.int32, device=device), slots.numel(),
                    torch.zeros(KV_HEADS, slots.numel(), device=device))


def check_kernel(device: str) -> None:
    """Scattered slots, keys past some queries' positions (masked), a padding row (sees
    nothing, adds nothing), a row computed but not scored, row and key counts off the tiles,
    the keys split across programs or not, a grid sized for more keys than the row has (as
    in a graph: the stale slots past it are never read), three row tiles (the mass kernel's
    loop runs to its bound, the tiles past them skipped), mass accumulated over two layers:
    the kernels' output and mass are the definition's (fp32: to 1e-4; bf16, on the GPU:
    within the logits' rounding; the interpreter's dot is not bf16's)."""
    from epic_sglang.scout_attention import scout_layer_triton

    gen = torch.Generator().manual_seed(0)
    positions = [40, 150, 250, 270, -1, 275, 276, 278, 280, 299] + list(range(100, 140))
    scored = [False, True, True, True, False, True, True, True, True, True] + [True, False] * 20
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2))[:2 if device == "cuda" else 1]:
        for split, max_keys in ((64, KEYS), (1024, KEYS), (64, KEYS + 70)):
            buffers = [(torch.randn(POOL, KV_HEADS, HEAD_DIM, generator=gen) * 2).to(dtype) for _ in range(4)]
            q = [(torch.randn(len(positions), KV_HEADS * GROUP, HEAD_DIM, generator=gen) * 2).to(dtype) for _ in range(2)]
            slots = torch.cat([torch.randperm(POOL, generator=gen)[:KEYS], torch.full((max_keys - KEYS,), POOL + 10**6)])
            ref, got = _seq(positions, scored, slots, KEYS, "cpu"), _seq(positions, scored, slots, KEYS, device)
            for layer in range(2):
                keys, values = buffers[2 * layer], buffers[2 * layer + 1]
                expected = scout_layer_torch(apply_rotation(q[layer].float(), *ref.q_rope), keys.float(), values.float(),
                                             ref, True)
                out = scout_layer_triton(apply_rotation(q[layer].to(device), *got.q_rope), keys.to(device),
                                         values.to(device), got, True, split=split).float().cpu()
                torch.testing.assert_close(out, expected, rtol=tol, atol=tol * float(expected.abs().max()))
                assert float(out[positions.index(-1)].abs().sum()) == 0.0  # the padding row
            mass, expected_mass = got.mass.sum(0).cpu()[:KEYS], ref.mass.sum(0)[:KEYS]
            torch.testing.assert_close(mass, expected_mass, rtol=tol, atol=tol * float(expected_mass.abs().max()))
            assert float(got.mass.cpu()[:, KEYS:].abs().sum()) == 0.0  # past the row: untouched
            assert float(mass[max(positions) + 1:].abs().sum()) == 0.0  # after every query: masked


def test_scout_definition_weights_only_scored_rows():
    """The torch definition: the mass is the scored rows' softmax probabilities times the
    values' norms (summed over heads); an unscored row changes the output, not the mass."""
    gen = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(20, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    q = torch.randn(2, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    seq = _seq([15, 19], [False, True], torch.arange(20), 20, "cpu")
    scout_layer_torch(q, keys, values, seq, True)
    cos, sin = _rope(torch.arange(20))
    k = apply_rotation(keys, cos, sin).repeat_interleave(GROUP, 1)  # (20, heads, d)
    probs = torch.softmax(torch.einsum("hd,nhd->hn", q[1], k) / HEAD_DIM ** 0.5, -1)  # the last query sees all
    expected = (probs * values.norm(dim=-1).repeat_interleave(GROUP, 1).T).sum(0)
    torch.testing.assert_close(seq.mass.sum(0), expected)


def test_scout_kernels_in_the_interpreter():
    check_kernel_in_interpreter("test_scout_attention")


@pytest.mark.gpu
def test_scout_kernels_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    check_kernel("cuda")
