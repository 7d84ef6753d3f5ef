"""Decode attention at small live batches: how the context splits and the key block change its time.
A decode bucket of B rows holds `live` rows of context `ctx` (the others padded, context 0), as the engine
runs it. Kernel time (the attention kernel plus the split merge) from CUPTI (`mosaic.gpu.profiler.measure`)
over 16 layers, each with its own cache, so pages come from HBM, not L2. Qwen3-0.6B's heads, pages of 256.

    python examples/attention_probe.py --cases 16:1 16:2 16:4 16:8 16:16 32:32 64:64 --ctx 512 1024 4096
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from nanovllm_jax.kernels import paged_attention as pa

LAYERS = 16
PAGE = 256


def kernel_us(fn, *args):
    from jax.experimental.mosaic.gpu import profiler

    _, times = profiler.measure(fn, iterations=10)(*args)
    return statistics.median(times) * 1e3 / LAYERS


def old_splits(batch, kv_heads, max_blocks):
    """The split count before splits followed the live rows: from the bucket's rows alone."""
    want = max(1, pa._target_programs() // (batch * kv_heads))
    return max(1, min(pa._pow2_floor(want), max_blocks))


def variants(bucket, kv_heads, max_pages):
    """(label, kwargs) of the kernel's settings to time."""
    old = old_splits(bucket, kv_heads, max_pages * PAGE // 256)
    out = [(f"{old} splits fixed (the old count), 256-key blocks", dict(num_splits=old))]
    for block_k, stages in ((256, 2), (128, 2), (64, 2), (64, 3), (32, 2)):
        out.append((f"live splits, {block_k}-key blocks, {stages} stages", dict(block_k=block_k, num_stages=stages)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["16:1", "16:4", "16:16", "64:64"], help="bucket:live")
    p.add_argument("--ctx", type=int, nargs="+", default=[1024])
    p.add_argument("--heads", type=int, nargs=3, default=[16, 8, 128], help="q heads, kv heads, head dim")
    p.add_argument("--max-split-items", type=int, nargs="+", default=[pa.MAX_SPLIT_ITEMS])
    args = p.parse_args()
    q_heads, kv_heads, head_dim = args.heads
    table = []
    for case in args.cases:
        bucket, live = map(int, case.split(":"))
        for ctx in args.ctx:
            width = -(-ctx // PAGE)
            num_pages = live * width + 1
            rng = np.random.default_rng(0)
            keys = jax.random.split(jax.random.key(1), 2 * LAYERS)
            shape = (num_pages, kv_heads, PAGE, head_dim)
            caches = [jax.random.normal(k, shape, jnp.bfloat16) for k in keys]
            tables = np.zeros((bucket, width), np.int32)  # padded rows point at page 0 (never read)
            tables[:live] = rng.permutation(num_pages - 1)[: live * width].reshape(live, width) + 1
            tables = jnp.asarray(tables)
            lens = jnp.asarray([ctx] * live + [0] * (bucket - live), jnp.int32)
            q = jax.random.normal(jax.random.key(3), (bucket, q_heads, head_dim), jnp.bfloat16)
            ref = pa.paged_decode_attention_reference(q, caches[0], caches[1], tables, lens)
            kv_bytes = live * ctx * kv_heads * head_dim * 2 * 2
            for cap in args.max_split_items:
                pa.MAX_SPLIT_ITEMS = cap
                for label, kw in variants(bucket, kv_heads, width):
                    if "fixed" in label and cap != args.max_split_items[0]:
                        continue

                    @jax.jit
                    def run(q, caches, tables, lens, kw=kw):
                        return [
                            pa.paged_decode_attention(q, caches[2 * i], caches[2 * i + 1], tables, lens, **kw)
                            for i in range(LAYERS)
                        ]

                    out = np.asarray(run(q, caches, tables, lens)[0], np.float32)
                    err = float(np.max(np.abs(out - np.asarray(ref, np.float32))))
                    if not err < 2e-2:
                        print(f"bucket {bucket} live {live} ctx {ctx} {label}: WRONG (max err {err:.3g})", flush=True)
                        continue
                    us = kernel_us(run, q, caches, tables, lens)
                    name = label if "fixed" in label else f"{label}, split items {cap}"
                    tbs = kv_bytes / us / 1e6
                    print(f"bucket {bucket} live {live} ctx {ctx}: {us:7.2f} us {tbs:5.2f} TB/s  {name}", flush=True)
                    table.append((bucket, live, ctx, name, us, tbs))
    print("\n| bucket | live | ctx | settings | us per layer | TB/s |")
    print("|---:|---:|---:|---|---:|---:|")
    for bucket, live, ctx, name, us, tbs in table:
        print(f"| {bucket} | {live} | {ctx} | {name} | {us:.2f} | {tbs:.2f} |")


if __name__ == "__main__":
    main()
