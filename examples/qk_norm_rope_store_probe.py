"""The attention-input kernel (`kernels.qk_norm_rope_store`, q/k norms + RoPE + KV store) by token count and
tiles: the (q rows, kv rows) a program takes and its warps, with bf16 and fp8 caches. Kernel time from CUPTI
(`mosaic.gpu.profiler.measure`, median of 10 calls; XLA's copies of the undonated caches are not counted).
Qwen3-0.6B heads by default (16 q, 8 kv, head_dim 128), pages of 256. The default tiling is marked.

    python examples/qk_norm_rope_store_probe.py [--tokens 16 256 16384] [--tiles 1:1:1 4:2:1 8:4:4]
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from nanovllm_jax.kernels import qk_norm_rope_store, qk_norm_rope_store_fp8
from nanovllm_jax.kernels.qk_norm_rope_store import default_tiling

PAGE, PAGES = 256, 72


def kernel_us(fn, caches, args):
    from jax.experimental.mosaic.gpu import profiler

    f = jax.jit(lambda *c: fn(*c, *args, theta=1e6, eps=1e-6))
    _, timings = profiler.measure(f, aggregate=False, iterations=10)(*caches)
    return statistics.median(sum(t for name, t in it if "qk_norm_rope_store" in name) for it in timings) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 512, 1024, 4096, 16384])
    p.add_argument(
        "--tiles",
        nargs="+",
        default=["1:1:1", "2:1:1", "4:2:1", "4:2:4", "8:4:4", "16:8:4"],
        help="q_rows:kv_rows:warps",
    )
    p.add_argument("--heads", type=int, nargs=3, default=[16, 8, 128], help="q heads, kv heads, head dim")
    args = p.parse_args()
    n, k, h = args.heads
    shape = (PAGES, k, PAGE, h)
    caches = {
        "bf16": (jnp.zeros(shape, jnp.bfloat16),) * 2,
        "fp8": (jnp.zeros(shape, jnp.uint8),) * 2 + (jnp.zeros(shape[:3], jnp.float32),) * 2,
    }
    entries = {"bf16": qk_norm_rope_store, "fp8": qk_norm_rope_store_fp8}
    tiles = [tuple(int(x) for x in t.split(":")) for t in args.tiles]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, heads {n}/{k}/{h}", flush=True)
    rows = []
    for tokens in args.tokens:
        rng = np.random.default_rng(0)
        qkv = jnp.asarray(rng.standard_normal((tokens, (n + 2 * k) * h)), jnp.bfloat16)
        positions = jnp.asarray(rng.integers(0, 4000, tokens), jnp.int32)
        slots = jnp.asarray(rng.permutation(PAGES * PAGE)[:tokens], jnp.int32)
        w = jnp.asarray(1 + 0.1 * rng.standard_normal(h), jnp.bfloat16)
        inputs = (qkv, positions, slots, w, w)
        default = default_tiling(tokens)
        for layout, entry in entries.items():
            for q_rows, kv_rows, warps in tiles:

                def fn(*a, rp=(q_rows, kv_rows), warps=warps, entry=entry, **kw):
                    return entry(*a, rows_per_program=rp, num_warps=warps, **kw)

                us = kernel_us(fn, caches[layout], inputs)
                mark = " (default)" if default == ((q_rows, kv_rows), warps) else ""
                rows.append((tokens, layout, f"({q_rows}, {kv_rows}) w{warps}{mark}", us))
                print("{} tokens {} {}: {:.2f} us".format(*rows[-1]), flush=True)
    print("\n| tokens | cache | (q rows, kv rows) warps | us |\n|---:|---|---|---:|")
    for tokens, layout, name, us in rows:
        print(f"| {tokens} | {layout} | {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
