"""Start the OpenAI-compatible server (nanovllm_jax.serve) and ask it two things with the official client.

    python examples/server.py [--model PATH]   # the server on 127.0.0.1 (a free port), two requests, stop
    python -m nanovllm_jax.serve --model PATH  # the server alone, on 127.0.0.1:8000 (or: nanovllm-jax-serve)

Without --model a tiny random checkpoint is used: gibberish text. Needs the `serve` extra and `openai`.
"""

import argparse
import threading
import time


def main(argv: list[str] | None = None, **engine_kw):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face Qwen3 directory (default: a tiny random checkpoint)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args(argv)

    import openai
    import uvicorn

    from nanovllm_jax.serve import build_llm, create_app

    app = create_app(build_llm(args.model, enforce_eager=args.enforce_eager, **engine_kw))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)  # the server's own event loop
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        print(f"serving {model!r} on http://127.0.0.1:{port}/v1")

        r = client.completions.create(model=model, prompt="Hello, how are you?", max_tokens=args.max_tokens)
        print(f"\ncompletion ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens): {r.choices[0].text!r}")

        print("\nchat, streamed: ", end="", flush=True)
        messages = [{"role": "user", "content": "What is machine learning?"}]
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
        )
        for chunk in stream:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
    finally:
        server.should_exit = True
        thread.join(60)


if __name__ == "__main__":
    main()
