"""querylink: the scout's attention mass, the picks it makes, and the link it runs."""
import shutil

import torch

from benchmarks.gpu_ttft import link_of, scout_of as scout
from epic_sglang import Engine, Request, SamplingParams
from epic_sglang.link_plan import plan_link, querylink_pick
from epic_sglang.policies import Segment, parse_policy


def first(engine, segments, policy, n=1):
    return engine.generate_batch([Request(segments=segments, policy=policy, sampling=SamplingParams(max_new_tokens=n),
                                          return_first_logits=True)])[0]




def test_scout_mass_equals_transformers_attention_times_value_norms(engine, hotpot):
    """One document at position 0: the scout's cached KV is exact, so its mass is HF's
    attention probabilities of the question rows times the norms of HF's values, summed over
    heads, rows and the scored layers (every other one here)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    doc = engine.prompts.encode_document(hotpot[8].paragraphs[0])
    question = tuple(engine.prompts.encode("Question: who is it about?\nAnswer:"))
    segs = [Segment(doc, document=0), Segment(question)]
    mass, plan = scout(engine, segs, "querylink-16-s2")
    with torch.inference_mode():
        out = hf(torch.tensor([doc + question]), output_attentions=True, use_cache=True)
    group = engine.config.num_heads // engine.config.num_kv_heads
    expect = torch.zeros(len(doc) + len(question))
    for layer in range(0, engine.config.num_layers - 1, 2):
        probs = out.attentions[layer][0, :, len(doc):, :].sum(1)  # (heads, n): summed over the question rows
        norms = out.past_key_values.layers[layer].values[0].norm(dim=-1)  # (kv heads, n)
        expect += (probs * norms.repeat_interleave(group, 0)).sum(0)
    assert mass.shape == expect.shape and plan.pick_budget > 0
    assert torch.allclose(mass, expect, atol=1e-4 * float(expect.max()), rtol=1e-4)


def test_querylink_is_a_plain_link_of_its_picks(engine, hotpot):
    """querylink = its scout's picks (`querylink_pick` of its mass) + the plain link of that
    token set: the same logits as naive's plan with those positions recomputed."""
    segs = engine.prompts.build(hotpot[9].question, list(hotpot[9].paragraphs[:5]), "Answer briefly.")
    first(engine, segs, "naive")  # compiles the documents and publishes the system prompt's exact KV
    mass, plan = scout(engine, segs, "querylink-16-h4")
    picks = querylink_pick(mass, plan, parse_policy("querylink-16-h4").block)
    lego = plan_link(parse_policy("legolink-16"), segs)
    in_docs = lambda p: int((p.recompute & p.document_mask()).sum())  # noqa: E731
    assert picks.numel() == plan.pick_budget == in_docs(lego) - in_docs(plan) > 0
    assert not plan.recompute[picks].any() and plan.document_mask()[picks].all()
    got = first(engine, segs, "querylink-16-h4")
    positions = sorted(plan.recompute.nonzero().flatten().tolist() + picks.tolist())
    assert got.recomputed_positions == positions
    assert torch.equal(link_of(engine, segs, positions), got.first_logits)  # naive's plan + heads + picks


def test_querylink_spends_legolink_budget_and_covering_it_equals_fr(engine, hotpot):
    docs = list(hotpot[10].paragraphs[:4])
    segs = engine.prompts.build(hotpot[10].question, docs, None)
    first(engine, segs, "naive")  # the template head's exact KV now comes from the prefix tree
    for k in (2, 16, 24):
        q, lego = first(engine, segs, f"querylink-{k}-h1"), first(engine, segs, f"legolink-{k}")
        assert q.stats.recomputed_tokens == lego.stats.recomputed_tokens
        assert q.stats.reused_tokens == lego.stats.reused_tokens > 0
    longest = max(len(engine.prompts.encode_document(d)) for d in docs)
    fr, everything = first(engine, segs, "fr", 8), first(engine, segs, f"querylink-{longest}-h1", 8)
    assert everything.stats.reused_tokens == 0
    assert everything.output_ids == fr.output_ids and torch.equal(everything.first_logits, fr.first_logits)


NEEDLE, ASK = 1234, 4321  # token ids the planted model gives a matching key and query


def planted_model(path, tokenizer_dir):
    """A 2-layer Llama whose layer 0 makes token ASK's query meet token NEEDLE's key (one
    barely rotating head dimension), and nothing else: the question must attend the needle."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   rope_theta=1e6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.normal_(0, 1)
        emb[:, 60:] = 0
        emb[NEEDLE, 63], emb[ASK, 62] = 40.0, 40.0
        attn = hf.model.layers[0].self_attn
        attn.q_proj.weight.normal_(0, 0.02)
        attn.k_proj.weight.normal_(0, 0.02)
        for head in range(4):  # head dim 7 (rotate-half pair 7: inverse frequency 1e6^-7/8, ~6e-6)
            attn.q_proj.weight[head * 16 + 7, 62] = 3.0
        for head in range(2):
            attn.k_proj.weight[head * 16 + 7, 63] = 3.0
    hf.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, path / f)
    return Engine(str(path), device="cpu", kv_cache_gb=0.02)


def test_planted_needle_is_picked(engine, tmp_path):
    planted = planted_model(tmp_path, engine.model_dir)
    g = torch.Generator().manual_seed(1)
    filler = lambda n: tuple(t for t in torch.randint(3000, 9000, (n,), generator=g).tolist())  # noqa: E731
    for where in (1, 2):
        docs = [list(filler(40)) for _ in range(3)]
        docs[where][25] = NEEDLE
        segs = [Segment(filler(6))] + [Segment(tuple(d), document=i) for i, d in enumerate(docs)] + [Segment(filler(3) + (ASK,))]
        needle_at = 6 + 40 * where + 25
        mass, plan = scout(planted, segs, "querylink-2-h1-b1")
        doc_mass = mass * plan.document_mask()
        top = doc_mass.topk(2).values
        assert int(doc_mass.argmax()) == needle_at and top[0] > 10 * top[1]
        r = first(planted, segs, "querylink-2-h1-b1")
        assert needle_at in r.recomputed_positions  # budget 3: the needle and two more
        blocks = first(planted, segs, "querylink-2-h1-b8")
        assert needle_at in blocks.recomputed_positions
        assert needle_at not in first(planted, segs, "legolink-2").recomputed_positions
