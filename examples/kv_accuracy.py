"""How much an fp8 KV cache changes the model's next-token distributions, against the model-dtype cache.

Teacher-forced: one prefill over each sequence (attention reads every key and value from the cache, so
every position sees quantized K/V under fp8), then per position the KL divergence KL(p_auto || p_fp8)
in nats and whether the top-1 tokens agree. Greedy: a prompt, then `--new-tokens` greedy decode steps
through the decode path with each cache; reports the share of generated tokens that agree and the first
step where the two diverge. Runs the kernels' jnp references (CPU) or the kernels (GPU).

    python examples/kv_accuracy.py MODEL_DIR [--seqs 4 --len 128 --new-tokens 32]

MODEL_DIR: e.g. `examples/train_tiny.py`'s output (its held-out text is used when present) or
`python -m nanovllm_jax.utils.checkpoint DIR --size qwen3-0.6b` (random weights, random token ids).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from nanovllm_jax.kernels import kv_cache_shapes
from transformers import AutoConfig

from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.utils.loader import load_model, make_mesh

BLOCK = 16


def make_cache(a, num_pages, kind):
    shapes = kv_cache_shapes(num_pages, a.num_kv_heads, BLOCK, a.head_dim, a.dtype, kind)
    return [tuple(jnp.zeros(s.shape, s.dtype) for s in shapes) for _ in range(a.num_layers)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--len", type=int, default=128, help="teacher-forced tokens per sequence")
    p.add_argument("--prompt", type=int, default=32, help="greedy: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy: generated tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    graphdef, state, _, a, _ = load_model(args.model, AutoConfig.from_pretrained(args.model), make_mesh(1))
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(args.seed)
    held_path = os.path.join(args.model, "heldout_ids.npy")
    if os.path.exists(held_path):
        held = np.load(held_path)
        starts = rng.integers(0, len(held) - args.len, args.seqs)
        seqs = [held[s : s + args.len].astype(np.int32) for s in starts]
        source = "held-out text"
    else:
        seqs = [rng.integers(0, a.vocab_size, args.len).astype(np.int32) for _ in range(args.seqs)]
        source = "random token ids"
    pages = -(-(args.len + args.new_tokens) // BLOCK)
    table = rng.permutation(pages + 1)[:pages].astype(np.int32)  # permuted pages, one spare

    @jax.jit
    def forward(ids, positions, caches, md):
        hidden, caches = model(ids, positions, caches, md)
        return model.compute_logits(hidden), caches

    def prefill(ids, caches):
        T = len(ids)
        slots = table[np.arange(T) // BLOCK] * BLOCK + np.arange(T) % BLOCK
        md = AttentionMetadata(
            slot_mapping=jnp.asarray(slots, jnp.int32),
            block_tables=jnp.asarray(table[None]),
            context_lens=jnp.asarray([T], jnp.int32),
            cu_q_lens=jnp.asarray([0, T], jnp.int32),
            is_prefill=True,
        )
        return forward(jnp.asarray(ids), jnp.arange(T, dtype=jnp.int32), caches, md)

    def decode(token, pos, caches):
        md = AttentionMetadata(
            slot_mapping=jnp.asarray([table[pos // BLOCK] * BLOCK + pos % BLOCK], jnp.int32),
            block_tables=jnp.asarray(table[None]),
            context_lens=jnp.asarray([pos + 1], jnp.int32),
            cu_q_lens=jnp.asarray([0, 1], jnp.int32),
            is_prefill=False,
        )
        return forward(jnp.asarray([token], jnp.int32), jnp.asarray([pos], jnp.int32), caches, md)

    kls, agree = [], []
    for ids in seqs:
        logp = {}
        for kind in ("auto", "fp8"):
            logits, _ = prefill(ids, make_cache(a, pages + 1, kind))
            logp[kind] = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        pa, pf = logp["auto"], logp["fp8"]
        kls.append(np.asarray(jnp.sum(jnp.exp(pa) * (pa - pf), axis=-1)))
        agree.append(np.asarray(pa.argmax(-1) == pf.argmax(-1)))
    kl, top1 = np.concatenate(kls), np.concatenate(agree)

    greedy_match, first_diff = [], []
    for ids in seqs:
        gen = {}
        for kind in ("auto", "fp8"):
            prompt = ids[: args.prompt]
            logits, caches = prefill(prompt, make_cache(a, pages + 1, kind))
            out = [int(logits[-1].argmax())]
            for i in range(args.new_tokens - 1):
                logits, caches = decode(out[-1], len(prompt) + i, caches)
                out.append(int(logits[-1].argmax()))
            gen[kind] = np.asarray(out)
        same = gen["auto"] == gen["fp8"]
        greedy_match.append(same.mean())
        first_diff.append(int(np.argmin(same)) if not same.all() else len(same))

    print(f"model {args.model}: {a.num_layers} layers, {a.num_kv_heads} kv heads, head_dim {a.head_dim}, {a.dtype}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"teacher-forced ({source}): {args.seqs} x {args.len} positions")
    print(f"  mean KL(auto || fp8) = {kl.mean():.2e} nats (max {kl.max():.2e}); top-1 agreement {top1.mean():.2%}")
    print(f"greedy: {args.seqs} prompts of {args.prompt} tokens, {args.new_tokens} new tokens each")
    print(f"  tokens agreeing {np.mean(greedy_match):.2%}; first divergence at steps {first_diff}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
