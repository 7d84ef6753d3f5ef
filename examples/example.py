"""The API reference's "With Transformers" example: a chat-templated prompt through `LLM.generate`.

    python examples/example.py --model ~/huggingface/Qwen3-0.6B/

Without --model it runs on a tiny random Qwen3 checkpoint (written once to a cache folder, with a
tokenizer and chat template of its own): every part of the engine runs, but the weights are random,
so the text is gibberish.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cached_checkpoint  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face Qwen3 directory (default: a tiny random checkpoint)")
    p.add_argument("--prompt", default="Hello, how are you?")
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from nanovllm_jax import LLM, SamplingParams

    if args.model:
        path, engine_kw = args.model, {}
    else:
        path = cached_checkpoint("tiny")
        # Small buckets, so the CPU compiles few programs at start-up.
        engine_kw = dict(max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=1024)
        print(f"model: tiny random Qwen3 checkpoint at {path}; its weights are random, so the text is gibberish")

    # Load tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)

    # Initialize the engine
    llm = LLM(path, enforce_eager=args.enforce_eager, **engine_kw)

    # Use chat template
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    sampling_params = SamplingParams(temperature=0.7, max_tokens=100)
    outputs = llm.generate([prompt], sampling_params)

    print(f"Prompt: {prompt!r}")
    print(f"Completion: {outputs[0]['text']!r}")


if __name__ == "__main__":
    main()
