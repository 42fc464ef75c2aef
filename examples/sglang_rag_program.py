"""A SGLang frontend RAG program against an epic-sglang server.

    epic-sglang serve --model qwen2.5-0.5b --store ~/rag-store &
    python examples/sglang_rag_program.py --url http://127.0.0.1:30000

Documents are marked with `document()`, so the server compiles each once and links its
cached KV behind any prefix: the second run, with another system prompt, reuses them.
"""
import argparse

import sglang as sgl

from epic_sglang.lang import EpicEndpoint, document

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was designed by "
    "Gustave Eiffel's company and finished in March 1889 for the World's Fair.",
    "Mount Fuji is the highest mountain in Japan at 3,776 metres. It is an active stratovolcano that last "
    "erupted in 1707, about 100 kilometres south-west of Tokyo.",
]


@sgl.function
def rag(s, system, docs, question):
    s += sgl.system(system)
    s += sgl.user("".join(document(d) for d in docs) + "Question: " + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0, stop="\n"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    sgl.set_default_backend(EpicEndpoint(args.url, api_key=args.api_key, policy="legolink-16"))
    for system in ("Answer from the documents.", "You are a terse assistant. Use the documents only."):
        state = rag.run(system=system, docs=DOCS, question="When was the tower finished?")
        meta = state.get_meta_info("answer")
        print(f"{state['answer']!r}  reused={meta['reused_tokens']} compiled={meta['compiled_tokens']} "
              f"ttft={meta['ttft'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
