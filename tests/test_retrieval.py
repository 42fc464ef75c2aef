"""Ingest and retrieval: real embedder, real FAISS, real SQLite; crash safety; bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from retrieval.chunker import chunk_text
from retrieval.ingest import ingest
from retrieval.retriever import Retriever, recall_at_k
from retrieval.store import DocumentStore


@pytest.fixture(scope="module")
def embedder():
    from retrieval.embedder import Embedder

    return Embedder()


def write_jsonl(path, examples):
    with open(path, "w") as f:
        for ex in examples:
            for title, text in zip(ex.titles, ex.paragraphs):
                f.write(json.dumps({"title": title, "text": text}) + "\n")


def unique_chunks(engine, examples) -> int:
    """Chunks the store should hold: long paragraphs split at 512 tokens, duplicates once."""
    count = lambda t: len(engine.prompts.encode(t + "\n\n"))  # noqa: E731
    return len({c.text for ex in examples for p in ex.paragraphs for c in chunk_text(p, count, 512)})


def test_chunks_respect_the_token_budget_and_sentence_boundaries(engine, hotpot):
    count = lambda t: len(engine.prompts.encode(t + "\n\n"))  # noqa: E731
    text = "\n\n".join(hotpot[0].paragraphs + hotpot[1].paragraphs)
    chunks = chunk_text(text, count, 64)
    assert len(chunks) > 5 and all(count(c.text) <= 64 for c in chunks)
    assert all(c.text == text[c.start:c.end].strip() for c in chunks)
    assert all(c.text[-1] in ".!?\")'" for c in chunks[:-1] if count(c.text) < 60)  # whole sentences
    long_word_run = "word " * 500
    assert all(count(c.text) <= 64 for c in chunk_text(long_word_run, count, 64))
    for spaceless in ("x" * 6000, "这是一个很长的中文文档，没有空格。" * 60, "a" * 900 + " short " + "b" * 900):
        pieces = chunk_text(spaceless, count, 64)
        assert len(pieces) > 3 and all(count(c.text) <= 64 for c in pieces)  # cut by tokens where no space is
        assert "".join(c.text for c in pieces).replace(" ", "") == spaceless.replace(" ", "")  # nothing lost


def test_ingest_dedupes_and_retrieves_gold_paragraphs(tmp_path, engine, hotpot, embedder):
    write_jsonl(tmp_path / "a.jsonl", hotpot[:20])
    store = DocumentStore(tmp_path / "store")
    first = ingest([str(tmp_path / "a.jsonl")], store, engine.tokenizer, embedder, progress=False)
    unique = unique_chunks(engine, hotpot[:20])
    assert first.added == unique == store.count() and store.index().ntotal == unique
    again = ingest([str(tmp_path / "a.jsonl")], store, engine.tokenizer, embedder, progress=False)
    assert again.added == 0 and store.count() == unique
    doc = store.list(limit=1)[0]
    assert doc.token_ids == tuple(engine.prompts.encode_document(doc.text))  # exactly the engine's document

    retriever = Retriever(store, embedder)
    hits = [[h.document.title for h in retriever.search(ex.question, top_k=10)] for ex in hotpot[:20]]
    assert recall_at_k(hits, [set(ex.supporting_titles) for ex in hotpot[:20]]) >= 0.8
    top = retriever.search(hotpot[0].question, top_k=3)
    assert [h.score for h in top] == sorted((h.score for h in top), reverse=True)
    assert retriever.search(hotpot[0].question, top_k=10, min_score=0.99) == []


def test_namespaces_and_delete(tmp_path, engine, hotpot, embedder):
    write_jsonl(tmp_path / "a.jsonl", hotpot[:2])
    write_jsonl(tmp_path / "b.jsonl", hotpot[2:4])
    store = DocumentStore(tmp_path / "store")
    ingest([str(tmp_path / "a.jsonl")], store, engine.tokenizer, embedder, namespace="a", progress=False)
    ingest([str(tmp_path / "b.jsonl")], store, engine.tokenizer, embedder, namespace="b", progress=False)
    retriever = Retriever(store, embedder)
    hits = retriever.search(hotpot[0].question, top_k=50, namespace="b")
    assert hits and all(h.document.namespace == "b" for h in hits)
    victim = retriever.search(hotpot[0].question, top_k=1, namespace="a")[0].document.id
    assert store.delete([victim]) == 1
    assert victim not in [h.document.id for h in retriever.search(hotpot[0].question, top_k=50)]
    assert DocumentStore(tmp_path / "store").index().ntotal == store.count()  # reopened: index matches


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "epic_sglang.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_bad_input_is_skipped_with_one_warning_each(tmp_path):
    (tmp_path / "good.txt").write_text("Alder Bay is a town. It has a harbour.\n\nCobalt Ridge is a hill.")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "table.xlsx").write_text("not supported")
    (tmp_path / "broken.md").symlink_to(tmp_path / "missing")
    (tmp_path / "mixed.jsonl").write_text('{"text": "Line one holds the Zephyr line."}\n{not json\n{"title": "x"}\n'
                                          '{"text": "Line four holds the Quillon bridge."}\n')
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer garbage")
    r = cli("ingest", str(tmp_path), "--store", str(tmp_path / "s"), "--model", "smollm2-135m", "--quiet")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("epic-sglang: warning: skipped")]
    assert len(warnings) == 6, r.stderr  # 3 unreadable files, the broken PDF, 2 bad JSONL lines
    assert any("broken.pdf" in w for w in warnings) and any("mixed.jsonl line 2" in w for w in warnings)
    assert any("mixed.jsonl line 3" in w for w in warnings)
    assert "ingested 2 files (4 skipped)" in r.stdout  # the JSONL file's good lines are in
    texts = [d.text for d in DocumentStore(tmp_path / "s").list(limit=100)]
    assert any("Zephyr" in t for t in texts) and any("Quillon" in t for t in texts)
    (tmp_path / "empty").mkdir()
    empty = cli("ingest", str(tmp_path / "empty"), "--store", str(tmp_path / "s2"), "--model", "smollm2-135m", "--quiet")
    assert empty.returncode == 1 and "nothing could be ingested" in empty.stderr


def test_kill_9_during_ingest_then_rerun_completes_consistently(tmp_path, engine):
    from epic_sglang.data.hotpotqa import load_hotpotqa

    examples = load_hotpotqa()[:150]
    write_jsonl(tmp_path / "big.jsonl", examples)
    unique = unique_chunks(engine, examples)
    args = ["ingest", str(tmp_path / "big.jsonl"), "--store", str(tmp_path / "s"), "--model", "smollm2-135m", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "epic_sglang.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    db = tmp_path / "s" / "documents.sqlite3"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait until some batches are committed
        if db.exists() and DocumentStore(tmp_path / "s").count() > 0:
            os.killpg(proc.pid, signal.SIGSTOP)  # frozen at once: it cannot finish before we look
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # what it had committed when frozen is all there is
    proc.wait()
    partial = DocumentStore(tmp_path / "s").count()
    assert 0 < partial < unique, f"caught {partial} of {unique} chunks: the ingest should be mid-way"
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    store = DocumentStore(tmp_path / "s")
    texts = [d.text for d in store.list(limit=10_000)]
    assert len(texts) == len(set(texts)) == unique
    assert store.index().ntotal == unique


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF with one line of Helvetica text (built by hand: no PDF writer needed)."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
               b" /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_html_markdown_and_text_are_parsed(tmp_path):
    from retrieval.parsers import read_records

    (tmp_path / "a.pdf").write_bytes(minimal_pdf("The Zephyr line runs to Cobalt Ridge."))
    (tmp_path / "b.html").write_text("<html><head><title>Harbour</title><style>p{}</style></head>"
                                     "<body><p>Alder Bay has a harbour.</p><script>x=1</script><p>Ferries leave hourly.</p></body></html>")
    (tmp_path / "c.md").write_text("# Notes\n\nCobalt Ridge is 400 m high.")
    pdf = list(read_records(tmp_path / "a.pdf"))
    assert len(pdf) == 1 and "Zephyr line runs to Cobalt Ridge" in pdf[0].text
    html = list(read_records(tmp_path / "b.html"))[0]
    assert html.title == "Harbour" and "Alder Bay has a harbour." in html.text and "Ferries leave hourly." in html.text
    assert "x=1" not in html.text and "p{}" not in html.text
    assert "400 m high" in list(read_records(tmp_path / "c.md"))[0].text


def test_ingest_compile_fills_the_disk_tier_resumably_and_ask_reuses_it(tmp_path, hotpot):
    write_jsonl(tmp_path / "docs.jsonl", hotpot[:3])
    common = ["--store", str(tmp_path / "s"), "--model", "smollm2-135m", "--kv-dir", str(tmp_path / "kv"),
              "--quiet", "--device", "cpu"]
    first = cli("ingest", str(tmp_path / "docs.jsonl"), "--compile", *common)
    assert first.returncode == 0, first.stderr
    count = DocumentStore(tmp_path / "s").count()
    assert f"compiled {count} documents" in first.stdout and "0 already on disk" in first.stdout
    assert len(list((tmp_path / "kv" / "docs").rglob("*.safetensors"))) == count
    again = cli("ingest", str(tmp_path / "docs.jsonl"), "--compile", *common)  # resumes: nothing left to do
    assert again.returncode == 0 and f"compiled 0 documents (0 tokens; {count} already on disk)" in again.stdout
    asked = cli("ask", hotpot[0].question, "--top-k", "3", "--max-new-tokens", "4",
                *[a for a in common if a != "--quiet"])
    assert asked.returncode == 0, asked.stderr
    assert "compiled=0 " in asked.stderr  # every retrieved document came from the disk tier
