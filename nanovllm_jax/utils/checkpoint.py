"""Random Qwen3 checkpoints in Hugging Face format, for tests, the README's run and GPU benchmarks.

Writes config.json, generation_config.json, model.safetensors (or shards with an index), and a
byte-level BPE tokenizer trained here with `tokenizers` plus a chat template. No download. The
weights are random, so the text is gibberish; with `ignore_eos=True` the cost equals real weights.

    python -m nanovllm_jax.utils.checkpoint DIR [--size SIZE] [--dtype float32|bfloat16]  # SIZE: see SIZES
"""

import argparse
import json
import math
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SIZES = {
    # GQA 2, tied, head_dim 64, vocab not a power of two.
    "tiny": dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # GQA 1 (MHA), untied, head_dim 128.
    "tiny-mha": dict(
        vocab_size=1003,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    # GQA 4, untied, head_dim 64, three layers.
    "tiny-gqa4": dict(
        vocab_size=777,
        hidden_size=80,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    ),
    # A Qwen2-style checkpoint: q/k/v biases, no q/k norm, head_dim from hidden / heads.
    "tiny-qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    # The published Qwen3-0.6B architecture.
    "qwen3-0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
    # The published Qwen3-8B architecture (for tensor-parallel benchmarks).
    "qwen3-8b": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # The published Qwen3-14B architecture.
    "qwen3-14b": dict(
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
}
# Checkpoints above this many parameters draw each tensor larger than POOL elements as a rolled repeat of
# one random pool: written in seconds instead of minutes, and costing the same to run.
POOLED_ABOVE, POOL = 2**31, 2**24
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = """The quick brown fox jumps over the lazy dog. Large language models generate text one token
at a time; a paged key-value cache keeps the keys and values of every sequence in fixed-size blocks.
Continuous batching admits new requests while others decode. Prefix caching reuses the blocks of a
shared prompt. JAX compiles each step once per batch bucket, and Pallas kernels read the cache pages.
Hello, how are you? What is machine learning? Explain quantum computing in simple terms.
Write a short story about a robot. Explain photosynthesis. What is the capital of France?
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " the of and to in is it
"""


def hf_config(size: str, dtype: str, config_style: str = "new", rope_theta: float = 1e6) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    cfg = (
        dict(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            hidden_act="silu",
            rms_norm_eps=1e-6,
            max_position_embeddings=2048,
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            bos_token_id=0,
            eos_token_id=0,
            dtype=dtype,
        )
        | SIZES[size]
    )
    if config_style == "new":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    elif config_style == "old":  # transformers 4.x style: top-level rope_theta, torch_dtype
        cfg |= {"rope_theta": rope_theta, "rope_scaling": None, "torch_dtype": cfg.pop("dtype")}
    else:
        raise ValueError(f"config_style must be 'new' or 'old', got {config_style!r}")
    return cfg


def random_weights(cfg: dict, seed: int):
    """Yields (name, array) for every tensor of the checkpoint, in HF names and [out, in] layout."""
    rng = np.random.default_rng(seed)
    dtype = ml_dtypes.bfloat16 if cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" else np.float32
    d, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = cfg.get("head_dim") or d // n
    qwen2 = cfg["model_type"] == "qwen2"
    layer = d * (n + 2 * k) * h + n * h * d + 3 * d * inter
    pool = None
    if cfg["num_hidden_layers"] * layer + v * d * (1 + (not cfg["tie_word_embeddings"])) > POOLED_ABOVE:
        pool = rng.standard_normal(POOL, dtype=np.float32).astype(dtype)

    def normal(*shape, std=0.02):
        size = math.prod(shape)
        if pool is None or size <= POOL:
            return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
        rolled = np.roll(pool, int(rng.integers(POOL))) * np.asarray(std, dtype)
        return np.resize(rolled, size).reshape(shape)

    def norm(dim):  # around 1, not exactly 1, so a wrong norm weight shows in parity tests
        return (1.0 + rng.standard_normal(dim, dtype=np.float32) * 0.1).astype(dtype)

    yield "model.embed_tokens.weight", normal(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm(d)
        yield p + "self_attn.q_proj.weight", normal(n * h, d)
        yield p + "self_attn.k_proj.weight", normal(k * h, d)
        yield p + "self_attn.v_proj.weight", normal(k * h, d)
        if qwen2:
            yield p + "self_attn.q_proj.bias", normal(n * h, std=0.1)
            yield p + "self_attn.k_proj.bias", normal(k * h, std=0.1)
            yield p + "self_attn.v_proj.bias", normal(k * h, std=0.1)
        else:
            yield p + "self_attn.q_norm.weight", norm(h)
            yield p + "self_attn.k_norm.weight", norm(h)
        yield p + "self_attn.o_proj.weight", normal(d, n * h)
        yield p + "post_attention_layernorm.weight", norm(d)
        yield p + "mlp.gate_proj.weight", normal(inter, d)
        yield p + "mlp.up_proj.weight", normal(inter, d)
        yield p + "mlp.down_proj.weight", normal(d, inter)
    yield "model.norm.weight", norm(d)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", normal(v, d)


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE (Qwen's kind) of at most `vocab_size` tokens, the special tokens first, on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str, model_max_length: int = 131072):
    """`tok` as a Hugging Face fast tokenizer in `path` (tokenizer.json, tokenizer_config.json)."""
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            dict(
                tokenizer_class="PreTrainedTokenizerFast",
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                bos_token=None,
                chat_template=CHAT_TEMPLATE,
                model_max_length=model_max_length,
            ),
            f,
            indent=1,
        )


def write_tokenizer(path: str, vocab_size: int):
    tok = train_tokenizer([_CORPUS] * 4, min(vocab_size, 600))
    save_tokenizer(tok, path)
    return tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")


def make_checkpoint(
    path: str, size: str = "tiny", dtype: str = "float32", seed: int = 0, num_shards: int = 1, config_style: str = "new"
) -> str:
    """Writes a random Qwen3 checkpoint of `size` to `path` (created) and returns `path`."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    os.makedirs(path, exist_ok=True)
    cfg = hf_config(size, dtype, config_style)
    endoftext, im_end = write_tokenizer(path, cfg["vocab_size"])
    cfg["bos_token_id"], cfg["eos_token_id"] = endoftext, im_end
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext]}, f, indent=1)
    tensors = dict(random_weights(cfg, seed))
    if num_shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(tensors)
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[s::num_shards]
        save_file({name: tensors[name] for name in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 for published sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--config-style", default="new", choices=["new", "old"])
    args = p.parse_args()
    dtype = args.dtype or ("float32" if args.size.startswith("tiny") else "bfloat16")
    print(make_checkpoint(args.path, args.size, dtype, args.seed, args.num_shards, args.config_style))


if __name__ == "__main__":
    main()
