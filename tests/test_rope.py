"""RoPE helpers and the FlashInfer link-plan arithmetic (pure torch; runs on CPU)."""
import torch

from epic_sglang.models.config import ModelConfig
from epic_sglang.models.rope import Rotary, inverse_frequencies, rotate_by

CFG = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8,
                                    num_hidden_layers=1, num_attention_heads=2, rope_theta=10000.0))


def test_table_rotation_equals_direct_rotation():
    x = torch.randn(50, 2, 32)
    pos = torch.randint(0, 3000, (50,))
    assert torch.allclose(Rotary(CFG, torch.device("cpu")).rotate(x, pos), rotate_by(x, pos, inverse_frequencies(CFG)), atol=1e-4)


def test_rotations_compose_so_mask_mode_can_shift_queries():
    """The mask link mode pre-rotates a query by (true - kernel) position; the kernel then
    rotates by the kernel position. The sum must be the true rotation."""
    inv = inverse_frequencies(CFG)
    x = torch.randn(40, 2, 32)
    true = torch.randint(0, 4000, (40,))
    kernel = torch.randint(0, 4000, (40,))
    assert torch.allclose(rotate_by(rotate_by(x, true - kernel, inv), kernel, inv), rotate_by(x, true, inv), atol=1e-3)


def test_query_runs_split_scattered_link_queries():
    from epic_sglang.attention.flashinfer_backend import query_runs

    # prefix 0-3 + first token of doc at 10-11 + doc at 20-22 + question at 30
    assert query_runs([0, 1, 2, 3, 10, 11, 20, 21, 22, 30]) == [(4, 4), (6, 12), (9, 23), (10, 31)]
    assert query_runs(list(range(5))) == [(5, 5)]
    assert query_runs([7]) == [(1, 8)]
