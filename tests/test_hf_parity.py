"""Correctness anchor: `fr` through our engine reproduces transformers' greedy output."""
import torch

from epic_sglang import Request, SamplingParams


def prompts(hotpot):
    """Ten prompts: chat-templated RAG prompts of 1,000+ tokens, short ones, custom systems."""
    out = []
    for ex in hotpot[:4]:  # all ten paragraphs of a HotpotQA question
        out.append(dict(question=ex.question, documents=list(ex.paragraphs)))
    for ex in hotpot[4:7]:
        out.append(dict(question=ex.question, documents=list(ex.paragraphs[:3]), system="Answer in one short sentence."))
    out.append(dict(question="What is the capital of France?", documents=[]))
    out.append(dict(question="Write a haiku about the sea.", documents=[], system="You are a poet."))
    out.append(dict(question="Summarize the text.", documents=[hotpot[8].paragraphs[0]]))
    return out


def hf_greedy(hf_model, prompt_ids, eos, n=32):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        logits = hf_model(ids).logits[0, -1].float()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    return out[0, ids.shape[1]:].tolist(), logits


def test_fr_matches_transformers_token_for_token(engine, hf_model, hotpot):
    reqs = [Request(**p, policy="fr", sampling=SamplingParams(max_new_tokens=32), return_first_logits=True)
            for p in prompts(hotpot)]
    results = engine.generate_batch(reqs)
    assert max(len(r.prompt_ids) for r in results) >= 1000
    assert sum(len(r.prompt_ids) >= 1000 for r in results) >= 3
    for r in results:
        expect_ids, expect_logits = hf_greedy(hf_model, r.prompt_ids, engine.eos_token_ids)
        expect_ids = expect_ids[:len(r.output_ids)] if r.finish_reason["type"] == "stop" else expect_ids
        assert r.output_ids == expect_ids, (len(r.prompt_ids), r.text)
        assert (r.first_logits - expect_logits).abs().max().item() < 1e-3


def test_prompt_is_the_chat_template_with_documents_in_the_user_turn(engine, hotpot):
    ex = hotpot[0]
    r = engine.generate(ex.question, list(ex.paragraphs[:2]), system="Be brief.", policy="fr", max_new_tokens=1)
    text = engine.tokenizer.decode(r.prompt_ids)
    content = f"{ex.paragraphs[0]}\n\n{ex.paragraphs[1]}\n\nQuestion: {ex.question}"
    assert text == engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
        tokenize=False, add_generation_prompt=True)
    # Each document's tokens are its own tokenization, never re-tokenized in context.
    doc = engine.prompts.encode_document(ex.paragraphs[1])
    start = len(engine.prompts.encode(engine.prompts.template_parts("Be brief.")[0])) + len(engine.prompts.encode_document(ex.paragraphs[0]))
    assert tuple(r.prompt_ids[start:start + len(doc)]) == doc
