"""Our decoder against transformers for each supported architecture and RoPE variant, on
tiny random checkpoints (the real-weight anchor is test_hf_parity.py)."""
import shutil

import pytest
import torch

from epic_sglang import Engine, Request, SamplingParams

BASE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
CASES = {
    "llama-llama3-rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "llama-linear-rope-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=16)),
    "qwen2-bias": ("Qwen2Config", dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3-qk-norm": ("Qwen3Config", dict(head_dim=32)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(engine):
    return engine.model_dir


@pytest.mark.parametrize("case", sorted(CASES))
def test_fr_logits_match_transformers(case, tmp_path, tokenizer_dir, hotpot):
    import transformers

    cls_name, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**(BASE | extra))
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is too flat to tell architectures apart; widen it
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, tmp_path / f)

    engine = Engine(str(tmp_path), device="cpu", kv_cache_gb=0.05)
    docs = list(hotpot[7].paragraphs[:4])
    fr = engine.generate_batch([Request(hotpot[7].question, docs, None, "fr", SamplingParams(max_new_tokens=1),
                                        return_first_logits=True)])[0]
    with torch.inference_mode():
        expect = hf(torch.tensor([fr.prompt_ids])).logits[0, -1]
    assert len(fr.prompt_ids) > 300  # past llama3's original context of 256
    assert (fr.first_logits - expect).abs().max() < 1e-4 * expect.abs().max()
    lego = engine.generate_batch([Request(hotpot[7].question, docs, None, "legolink-2", SamplingParams(max_new_tokens=1),
                                          return_first_logits=True)])[0]
    assert lego.stats.reused_tokens > 0 and not torch.equal(lego.first_logits, fr.first_logits)
