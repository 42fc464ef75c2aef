"""GPU: the FlashInfer backend against the torch reference and transformers (needs CUDA and
flashinfer; a tokenizer folder from EPIC_TOKENIZER_DIR or the installed SmolLM2)."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1024,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=False, vocab_size=49152,
            bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    if importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer not installed")
    if os.environ.get("EPIC_TOKENIZER_DIR"):
        return Path(os.environ["EPIC_TOKENIZER_DIR"])
    from epic_sglang.models.loader import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


def test_flashinfer_matches_torch_reference_for_every_policy(tokenizer_dir):
    from benchmarks.gpu_ttft import CHECK_POLICIES, check_against_reference, model_dir, segments
    from epic_sglang import Engine
    from epic_sglang.attention import flashinfer_backend
    from epic_sglang.link_plan import CascadeTuning

    # At this size a link is one cascade group (no bulk entries) unless groups are small;
    # small chunks give rows a dozen bulk results to merge. Groups' local keys both ways:
    # a causal entry per run, and one position-masked Triton entry per tile of queries.

    engine = Engine(str(model_dir(TINY, tokenizer_dir)), device="cuda", load_format="dummy", kv_cache_gb=1)
    # Widen the random weights so logits are far from flat; both sides round in bf16 (the
    # reference rotates keys in bf16, FlashInfer in fp32), hence a cosine bar, not equality.
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    for masked_runs in (0, 10 ** 9):
        tuning = CascadeTuning(group=32, chunk=64, masked_runs=masked_runs)
        rows = check_against_reference(engine, segments(5, 300, 40, 20, TINY["vocab_size"], seed=3), min_cosine=0.998,
                                       tuning=tuning)
        assert len(rows) == len(CHECK_POLICIES) * len(flashinfer_backend.LINK_MODES)
        assert all(r.endswith("| ok |") for r in rows)


def test_decode_cuda_graphs_match_eager_decode(tokenizer_dir):
    from benchmarks.gpu_ttft import model_dir, segments
    from epic_sglang import Engine, Request, SamplingParams

    engine = Engine(str(model_dir(TINY, tokenizer_dir)), device="cuda", load_format="dummy", kv_cache_gb=1)
    assert engine.decode_graphs is not None
    with torch.no_grad():  # peaky logits: greedy tokens well defined
        for _, p in engine.model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)

    def run():  # 3 sequences: the 4-wide graph pads one row
        return engine.generate_batch([Request(segments=segments(2, 100, 10, 5, TINY["vocab_size"], seed=i),
                                              policy="legolink-16", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
                                      for i in range(3)])
    graphed = run()
    graphs, engine.decode_graphs = engine.decode_graphs, None
    eager = run()
    engine.decode_graphs = graphs
    assert [g.output_ids for g in graphed] == [e.output_ids for e in eager]



def test_decode_cuda_graphs_read_shared_documents_beyond_the_pool(tokenizer_dir):
    """24 requests linking the same documents: a step reads ~23K keys from a 4,096-slot pool
    (each row holds the shared documents' slots), more than the pool, as the graph must allow."""
    from benchmarks.gpu_ttft import model_dir, segments
    from epic_sglang import Engine, Request, SamplingParams

    engine = Engine(str(model_dir(TINY, tokenizer_dir)), device="cuda", load_format="dummy", kv_cache_gb=0.001)
    with torch.no_grad():
        for _, p in engine.model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)

    def run():
        return engine.generate_batch([Request(segments=segments(3, 300, 10, 5, TINY["vocab_size"], seed=0),
                                              policy="legolink-16", sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))
                                      for _ in range(24)])
    graphed = run()
    assert engine.allocator.size < 24 * 900
    graphs, engine.decode_graphs = engine.decode_graphs, None
    eager = run()
    engine.decode_graphs = graphs
    assert [g.output_ids for g in graphed] == [e.output_ids for e in eager]


def test_scout_cuda_graphs_match_the_eager_scout(tokenizer_dir):
    """querylink's scout replayed from CUDA graphs (two question lengths, two contexts: the
    same graph over another row, padding queries) gives the eager Triton scout's mass (its
    merge sums more, empty, key splits: to rounding), hence the same picks and logits."""
    from benchmarks.gpu_ttft import first_result, model_dir, scout_of, segments
    from epic_sglang import Engine

    engine = Engine(str(model_dir(TINY, tokenizer_dir)), device="cuda", load_format="dummy", kv_cache_gb=1)
    with torch.no_grad():
        for _, p in engine.model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    prompts = [segments(4, 300, 40, 20, TINY["vocab_size"], seed=7), segments(7, 200, 13, 20, TINY["vocab_size"], seed=8)]
    for segs in prompts:
        engine.compile_segments(segs, "legolink-16")
        first_result(engine, segs, "naive")  # the head's exact KV is published: the scout computes the question alone

    def run():
        return [(scout_of(engine, segs, "querylink-16")[0], first_result(engine, segs, "querylink-16"),
                 scout_of(engine, segs, "querylink-16-s2")[0]) for segs in prompts]
    graphed = run()
    assert set(engine._scout_graph_set.graphs) == {(16, 1), (64, 1), (16, 2), (64, 2)}
    engine.cuda_graphs, engine._scout_graph_set = False, None
    eager = run()
    for (mass, result, strided), (mass_e, result_e, strided_e) in zip(graphed, eager):
        torch.testing.assert_close(mass, mass_e, rtol=1e-5, atol=0)
        torch.testing.assert_close(strided, strided_e, rtol=1e-5, atol=0)
        assert mass.abs().sum() > 0 and not torch.allclose(mass, strided)
        assert result.recomputed_positions == result_e.recomputed_positions
        assert torch.equal(result.first_logits, result_e.first_logits)


def tiny_qwen2(tokenizer_dir: Path, out: Path, widen: bool):
    from benchmarks.gpu_ttft import random_checkpoint

    return random_checkpoint(TINY | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
                             tokenizer_dir, out, widen)


def engine_fr(engine, ids, n):
    from epic_sglang import Request, SamplingParams
    from epic_sglang.policies import Segment

    return engine.generate_batch([Request(segments=[Segment(ids)], policy="fr", return_first_logits=True,
                                          sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))])[0]


IDS = tuple(torch.randint(100, 40000, (700,), generator=torch.Generator().manual_seed(5)).tolist())


def test_fr_matches_transformers_on_gpu_fp32(tokenizer_dir, tmp_path):
    """fp32 on the GPU (torch backend): the same exactness as the CPU anchor."""
    from epic_sglang import Engine

    hf = tiny_qwen2(tokenizer_dir, tmp_path, widen=True).to("cuda").eval()
    engine = Engine(str(tmp_path), device="cuda", dtype=torch.float32, kv_cache_gb=1)
    r = engine_fr(engine, IDS, 8)
    with torch.inference_mode():
        expect = hf(torch.tensor([IDS], device="cuda")).logits[0, -1].float().cpu()
        greedy = hf.generate(torch.tensor([IDS], device="cuda"), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=0)[0, len(IDS):].tolist()
    assert (r.first_logits - expect).abs().max() < 1e-3 * expect.abs().max()
    assert r.output_ids == greedy


def test_fr_flashinfer_bf16_tracks_transformers_bf16(tokenizer_dir, tmp_path):
    from epic_sglang import Engine

    hf = tiny_qwen2(tokenizer_dir, tmp_path, widen=False).to("cuda", torch.bfloat16).eval()
    engine = Engine(str(tmp_path), device="cuda", kv_cache_gb=1)
    assert type(engine.attention).__name__ == "FlashInferAttention"
    r = engine_fr(engine, IDS, 1)
    with torch.inference_mode():
        expect = hf(torch.tensor([IDS], device="cuda")).logits[0, -1].float().cpu()
    assert torch.nn.functional.cosine_similarity(r.first_logits, expect, dim=0) > 0.99
