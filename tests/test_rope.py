"""RoPE: frequencies and rotation (pure torch; runs on CPU)."""
import torch

from epic_sglang.models.config import ModelConfig
from epic_sglang.models.rope import Rotary, apply_rotation, inverse_frequencies

CFG = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8,
                                    num_hidden_layers=1, num_attention_heads=2, rope_theta=10000.0))


def test_rotation_by_table_matches_the_formula():
    x = torch.randn(50, 2, 32)
    pos = torch.randint(0, 3000, (50,))
    angle = pos.double()[:, None] * inverse_frequencies(CFG).double()[None, :]  # (50, 16)
    x1, x2 = x[..., :16].double(), x[..., 16:].double()
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    expect = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    got = apply_rotation(x, *Rotary(CFG, torch.device("cpu")).cos_sin(pos, torch.float32))
    assert torch.allclose(got.double(), expect, atol=1e-3)
