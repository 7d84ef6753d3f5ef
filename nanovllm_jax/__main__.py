"""`python -m nanovllm_jax`: generate with the LLM API, on a model directory or an embedded default.

Without --model, a tiny random Qwen3 checkpoint is written to a cache folder first (no download; its
weights are random, so the text is gibberish, but every part of the engine runs).
"""

import argparse
import os
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face Qwen3 directory (default: a tiny random checkpoint)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()

    from nanovllm_jax import LLM, SamplingParams
    from nanovllm_jax.utils.checkpoint import make_checkpoint

    model = args.model
    if model is None:
        model = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_jax", "tiny-qwen3")
        if not os.path.isfile(os.path.join(model, "config.json")):
            make_checkpoint(model, "tiny")
        print(f"model: tiny random Qwen3 checkpoint at {model} (random weights: the text is gibberish)")
    t = time.perf_counter()
    llm = LLM(
        model,
        max_model_len=args.max_model_len,
        max_num_seqs=16,
        max_num_batched_tokens=1024,
        enforce_eager=args.enforce_eager,
    )
    print(f"start-up: {time.perf_counter() - t:.1f} s")
    prompts = ["Hello, how are you?", "What is machine learning?", "Explain quantum computing in simple terms."]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        print(f"\nprompt: {prompt!r}\ntokens: {out['token_ids']}\ntext:   {out['text']!r}")


if __name__ == "__main__":
    main()
