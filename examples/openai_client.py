"""The official openai client against an epic-sglang server, with documents linked by PIC.

    epic-sglang serve --model qwen2.5-0.5b &
    python examples/openai_client.py --url http://127.0.0.1:30000/v1
"""
import argparse

import openai

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, finished in March 1889.",
    "Mount Fuji is the highest mountain in Japan at 3,776 metres.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000/v1")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "How high is Mount Fuji?"}]
    # `documents` (an epic-sglang extension) puts them before the question, each linked from its cache
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                         extra_body={"documents": DOCS, "policy": "legolink-16"})
    print(out.choices[0].message.content, out.model_extra["epic"])
    print("streaming: ", end="")
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                                stream=True, extra_body={"documents": DOCS}):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    done = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=16, temperature=0)
    print(done.choices[0].text)


if __name__ == "__main__":
    main()
