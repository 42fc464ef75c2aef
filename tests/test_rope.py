"""RoPE and the FlashInfer link-plan arithmetic (pure torch; runs on CPU)."""
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


def test_query_runs_split_scattered_link_queries():
    from epic_sglang.attention.flashinfer_backend import query_runs

    # prefix 0-3 + first token of doc at 10-11 + doc at 20-22 + question at 30
    assert query_runs([0, 1, 2, 3, 10, 11, 20, 21, 22, 30]) == [(4, 4), (6, 12), (9, 23), (10, 31)]
    assert query_runs(list(range(5))) == [(5, 5)]
    assert query_runs([7]) == [(1, 8)]


def test_auto_cascades_once_the_runs_key_prefixes_reach_the_threshold():
    from epic_sglang.attention.flashinfer_backend import AUTO_CASCADE_KEYS, wants_cascade

    # an 8K-token link of 16-token runs (62K run keys) stays per-run; a 16K one (255K) cascades
    short = [(16 * (i + 1), 512 * i + 16) for i in range(15)]
    long = [(16 * (i + 1), 512 * i + 16) for i in range(31)]
    assert not wants_cascade(short) and wants_cascade(long)
    assert wants_cascade([(1, AUTO_CASCADE_KEYS)]) and not wants_cascade([(1, AUTO_CASCADE_KEYS - 1)])


def visible_keys(bulk, local, positions):
    """Per query row, the keys its entries let it see (bulk: all of [k0, k1); local: causal,
    bottom-right aligned as FlashInfer does when kv is longer than the queries)."""
    seen = [[] for _ in positions]
    for q0, q1, k0, k1 in bulk:
        for row in range(q0, q1):
            seen[row] += range(k0, k1)
    for q0, q1, k0, k1 in local:
        for i, row in enumerate(range(q0, q1)):
            seen[row] += range(k0, k1 - (q1 - q0) + i + 1)
    return seen


def test_link_entries_give_every_query_exactly_the_keys_at_or_before_it():
    from epic_sglang.attention.flashinfer_backend import link_entries, query_runs, split_keys

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        # a head run, then k-token runs at scattered starts, then a question run
        starts = sorted(torch.randperm(400, generator=g)[:int(torch.randint(1, 12, (1,), generator=g))].tolist())
        positions = sorted({p for s in starts for p in range(3 * s, 3 * s + int(torch.randint(1, 20, (1,), generator=g)))})
        runs = query_runs(positions)
        for page, group, chunk in [(1, None, 1), (16, None, 16), (16, 8, 16), (16, 40, 64), (1, 1, 1 << 20)]:
            bulk, local = link_entries(runs, page, group)
            bulk = split_keys(bulk, chunk)  # the cascade's bulk keys in several entries
            assert all(k0 % chunk == 0 and 0 < k1 - k0 <= chunk for _, _, k0, k1 in bulk)
            assert all(k0 % page == 0 for _, _, k0, _ in local)
            for row, keys in enumerate(visible_keys(bulk, local, positions)):
                assert sorted(keys) == list(range(positions[row] + 1)), (trial, page, group, row)
            assert len(local) == len(runs) and (group is not None or bulk == [])
            if group == 1 and page == 1:  # every run but one at position 0 has its own bulk entry
                assert len(bulk) == len(runs) - (positions[0] == 0)
