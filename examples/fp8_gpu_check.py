"""fp8 KV cache on the GPU: probe fp8 loads in the Triton lowering, and time decode attention fp8 vs bf16.

Qwen3-0.6B heads (16 q, 8 kv, head_dim 128, page 256; `--q-heads 32`: Qwen3-8B's group of 4); batch 8
at context 4096 runs split contexts. Bytes actually read: K and V pages of every sequence (bf16: 2 bytes
per element; fp8: 1 byte per element plus a float32 scale per key and per value row), against the
4.24 TB/s copy ceiling measured on the H200 (shared/PERFORMANCE.md).

    python examples/fp8_gpu_check.py [--probe] [--sweep] [--q-heads 32]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from nanovllm_jax.kernels import kv_cache_shapes, paged_decode_attention

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 256
CEILING = 4.24e12


def probe():
    """A naive Triton-lowered kernel: load a [64, 128] tile, convert to float32, sum rows; against jnp."""
    x = jax.random.normal(jax.random.key(0), (64, 128), jnp.float32) * 10

    def run(arr, convert):
        def kernel(x_ref, o_ref):
            o_ref[...] = convert(x_ref[...]).sum(axis=1)

        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((64,), jnp.float32),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        )(arr)

    from nanovllm_jax.kernels.paged_attention import FP8_UNIT, decode_e4m3

    for name in ("float8_e4m3fn", "float8_e5m2"):
        dt = getattr(jnp, name)
        xq = x.astype(dt)
        want = xq.astype(jnp.float32).sum(axis=1)
        for how, conv in (
            ("astype(f32)", lambda t: t.astype(jnp.float32)),
            ("astype(bf16)->f32", lambda t: t.astype(jnp.bfloat16).astype(jnp.float32)),
            ("astype(f16)->f32", lambda t: t.astype(jnp.float16).astype(jnp.float32)),
        ):
            try:
                got = run(xq, conv)
                err = float(jnp.nanmax(jnp.abs(got - want))) if not jnp.isnan(got).any() else float("nan")
                print(f"probe {name:14s} load+{how:18s}: max err {err}", flush=True)
            except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
                print(f"probe {name:14s} load+{how:18s}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    xq = x.astype(jnp.float8_e4m3fn)
    raw = lax.bitcast_convert_type(xq, jnp.uint8)
    want = xq.astype(jnp.float32).sum(axis=1)
    for how in ("native", "int", "f16"):
        try:
            got = run(raw, lambda t, how=how: decode_e4m3(t, jnp.float32, how) * FP8_UNIT[how])
            print(f"probe uint8 load + decode_e4m3 {how:6s}: max err {float(jnp.abs(got - want).max())}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"probe uint8 load + decode_e4m3 {how}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


def median_time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_cache(kind, num_pages):
    shapes = kv_cache_shapes(num_pages, KV_HEADS, PAGE, HEAD_DIM, jnp.bfloat16, kind)
    keys = jax.random.split(jax.random.key(1), len(shapes))
    if kind == "auto":
        return tuple(jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes, strict=True))
    # fp8: random bytes of finite e4m3 values (never 0x7F / 0xFF), scales around 1/448
    data = [jax.random.randint(k, s.shape, 0, 0x7F, jnp.int32).astype(jnp.uint8) for k, s in zip(keys[:2], shapes)]
    scales = [jax.random.uniform(k, s.shape, jnp.float32, 1e-3, 3e-3) for k, s in zip(keys[2:], shapes[2:])]
    return (*data, *scales)


def time_decode(cache, batch, ctx, q_heads=Q_HEADS, **kw):
    """Seconds per decode attention call (fori_loop of n calls, query fed back), rotating distinct pages."""
    num_pages = cache[0].shape[0]
    width = ctx // PAGE
    rot = max(1, min(4, num_pages // (batch * width)))
    rng = np.random.default_rng(0)
    pages = rng.choice(num_pages, rot * batch * width, replace=False).reshape(rot, batch, width)
    tables = jnp.asarray(pages, jnp.int32)
    lens = jnp.full((batch,), ctx, jnp.int32)
    q = jax.random.normal(jax.random.key(3), (batch, q_heads, HEAD_DIM), jnp.bfloat16)
    n = 20

    def attend(q, cache, table, lens):
        scales = dict(k_scale=cache[2], v_scale=cache[3]) if len(cache) == 4 else {}
        return paged_decode_attention(q, cache[0], cache[1], table, lens, **scales, **kw)

    @jax.jit
    def many(q, cache, tables, lens):
        def body(i, q):
            for r in range(rot):
                q = (attend(q, cache, tables[r], lens) * 0.5 + q * 0.5).astype(q.dtype)
            return q

        return lax.fori_loop(0, n, body, q)

    sec = median_time(many, q, cache, tables, lens) / (n * rot)
    per_elem = 2 if len(cache) == 2 else 1
    nbytes = batch * ctx * KV_HEADS * 2 * (HEAD_DIM * per_elem + (4 if len(cache) == 4 else 0))
    return sec, nbytes / sec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--probe", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also try fp8 tuning variants")
    p.add_argument("--q-heads", type=int, default=Q_HEADS, help=f"query heads over {KV_HEADS} kv heads")
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.probe:
        probe()
    num_pages = 4 * 256 * 2048 // PAGE + 8  # room for 4 rotations at batch 256, context 2048
    rows = []
    full = ((64, 1024), (64, 2048), (256, 1024), (256, 2048), (8, 4096))
    few = ((64, 2048), (256, 1024))
    for kind in ("auto", "fp8"):
        cache = make_cache(kind, num_pages)
        decodes = [{}] if kind == "auto" else [dict(fp8_decode=h) for h in ("int", "native", "f16")]
        variants = [(kw, full) for kw in decodes]
        if args.sweep and kind == "fp8":
            variants += [
                (dict(fp8_decode=h, block_k=bk, num_stages=s), few)
                for h in ("int", "native", "f16")
                for bk, s in ((128, 3), (128, 4), (256, 2))
            ]
        for kw, shapes in variants:
            for batch, ctx in shapes:
                try:
                    sec, bw = time_decode(cache, batch, ctx, q_heads=args.q_heads, **kw)
                    rows.append((kind, str(kw), batch, ctx, sec * 1e6, bw / 1e12, 100 * bw / CEILING))
                    print("{} {} b={} ctx={}: {:.1f} us {:.2f} TB/s {:.1f}%".format(*rows[-1]), flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{kind} {kw} b={batch} ctx={ctx}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        del cache
    print(
        f"\n## decode attention, {args.q_heads} q / {KV_HEADS} kv heads: bytes read / kernel time (ceiling 4.24 TB/s)"
    )
    print("| cache | variant | batch | context | us | TB/s | % of 4.24 |")
    for r in rows:
        print("| {} | {} | {} | {} | {:.1f} | {:.2f} | {:.1f} |".format(*r))


if __name__ == "__main__":
    main()
