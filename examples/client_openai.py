"""Steer a served model per request with the official openai client.

Start the server first (scripts/quickstart.sh), then:

    .venv/bin/python examples/client_openai.py [--base-url http://127.0.0.1:8000/v1] [--scale 0.0224]

Each request picks its vectors in ``extra_body``: ``"icv": "name:scale,..."``
or ``"icv": [{"name": ..., "scale": ...}]``. Requests with different vectors
(or none) share the same batches.
"""

from __future__ import annotations

import argparse
import os

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--scale", type=float, default=0.0224,
                        help="strength of the polite vector (what icv-vllm tune recommends for the 135M demo model)")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    messages = [{"role": "user", "content": "My neighbour plays loud music every night. Write him a note."}]
    for label, extra in [
        ("no vector", {}),
        (f"polite:{args.scale}", {"icv": f"polite:{args.scale}"}),
        ("polite and formal", {"icv": [{"name": "polite", "scale": args.scale},
                                       {"name": "formal", "scale": args.scale / 2}]}),
    ]:
        reply = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=64, temperature=0.0, extra_body=extra)
        print(f"--- {label}\n{reply.choices[0].message.content}\n")

    # streaming works the same way
    print(f"--- polite:{args.scale}, streamed")
    stream = client.completions.create(model=args.model, prompt="Dear neighbour,", max_tokens=48,
                                       temperature=0.0, stream=True,
                                       extra_body={"icv": f"polite:{args.scale}"})
    for chunk in stream:
        print(chunk.choices[0].text if chunk.choices else "", end="", flush=True)
    print()

    # a bad selection is a 400 with a clear message; the server keeps serving
    try:
        client.completions.create(model=args.model, prompt="Hi", max_tokens=4, extra_body={"icv": "nope:0.1"})
    except openai.BadRequestError as e:
        print(f"\n--- unknown vector -> HTTP {e.status_code}: {e.body['message']}")


if __name__ == "__main__":
    main()
