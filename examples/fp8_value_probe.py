"""Where fp8 decode attention spends its time: the key tile, the value tile, their layout, and the kernel's tiles.

Default mode: a stripped copy of the decode kernel (grid (batch, kv head), one split) in which the key and
the value tiles are read each of several ways, named "K:V":
  K  bf16  bf16 pages;      f16  e4m3 bytes decoded to float16 (the kernel's "f16");
     f16u  the same, read unmasked and zeroed past the context in registers;
     fp8   e4m3 dots on the tensor cores, q split into two e4m3 terms (hi + lo / 16);
     fma   no key dot: each real query row times the decoded tile on the FMA units, summed over head_dim.
  V  bf16, f16, as K;       fp8  e4m3 dots, p split the same way;
     f16T, fp8T  pages stored transposed ([head_dim, page]: the value dot reads along the keys), masked
                 loads; f16Tu, fp8Tu unmasked;
     u16, u32    the bytes read as uint16 pairs / uint32 quads and multiplied as 2 / 4 narrower value tiles
                 (u16: the engine kernel's read);
     fma, fmar   no value dot: each real query row's probabilities times the decoded tile on the FMA units,
                 summed over the keys at the end (fma: a [keys, head_dim] accumulator per row) or at every
                 block (fmar).
Each variant is checked against a float32 reference on the dequantized pages, then timed by CUPTI.

`--tiles`: the engine's kernel (`paged_decode_attention`, fp8 pages) at batch 32-256 (`--batches`) with other
splits and tiles, or only the key blocks x stages given by `--blocks`.

Qwen3-0.6B heads (16 q, 8 kv, head_dim 128), pages of 256; bytes read = K and V bytes + their scales, against
the 4.24 TB/s copy ceiling.

    python examples/fp8_value_probe.py --shapes 64:1024 256:2048 [--variants f16:f16 f16:u16] [--sweep]
    python examples/fp8_value_probe.py --tiles [--batches 48 64 96 --blocks 64:3 128:2]
"""

import argparse
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F8 = jnp.float8_e4m3fn
MASK = -0.7 * float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).tiny)
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 256
GROUP, ROWS = Q_HEADS // KV_HEADS, 16
CEILING = 4.24e12
VARIANTS = [
    "bf16:bf16",
    "f16:f16",
    "f16:bf16",
    "bf16:f16",
    "f16u:f16",
    "f16:f16T",
    "f16:f16Tu",
    "fp8:bf16",
    "bf16:fp8",
    "fp8:fp8T",
    "fp8:fp8Tu",
    "f16:u16",
    "f16:u32",
    "f16:fma",
    "f16:fmar",
    "fma:fma",
]
PARTS = {"u16": 2, "u32": 4}  # value tiles per byte group


def _split_e4m3(x, top):
    """x * top (float32, |x * top| <= 256) -> e4m3 (hi, lo) with x * top ~ hi + lo / 16."""
    hi = (x * top).astype(F8)
    lo = ((x * top - hi.astype(jnp.float32)) * 16.0).astype(F8)
    return hi, lo


def _dot2(a, b, trans_b):
    """hi/lo e4m3 pairs a against b: a's hi + lo / 16."""
    hi, lo = a
    return plgpu.dot(hi, b, trans_b=trans_b) + plgpu.dot(lo, b, trans_b=trans_b) * 0.0625


def make_kernel(kmode, vmode, block_k):
    scale_log2 = HEAD_DIM**-0.5 * math.log2(math.e)
    parts = PARTS.get(vmode, 1)
    transposed = "T" in vmode
    unmasked_v = vmode.endswith("u") and transposed
    fma = vmode.startswith("fma")

    def kernel(lens_ref, tables_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref):
        b, head = pl.program_id(0), pl.program_id(1)
        ctx = lens_ref[b]
        row = lax.broadcasted_iota(jnp.int32, (ROWS,), 0)
        q = q_ref[b, head * GROUP + jnp.minimum(row, GROUP - 1), :].astype(jnp.float32)
        q_scale = 240.0 / jnp.maximum(jnp.abs(q).max(), 1e-30)
        if kmode == "bf16":
            qd = q.astype(jnp.bfloat16)
        elif kmode == "fp8":
            qd = _split_e4m3(q, q_scale)
        else:
            qd = q.astype(jnp.float16)

        def scores(page, offset, valid, mask):
            if kmode == "bf16":
                k = plgpu.load(k_ref.at[page, head, pl.ds(offset, block_k), :], mask=mask, other=0.0)
                return plgpu.dot(qd, k, trans_b=True) * scale_log2
            if kmode == "f16u":
                k = jnp.where(mask, k_ref[page, head, pl.ds(offset, block_k), :], 0)
            else:
                k = plgpu.load(k_ref.at[page, head, pl.ds(offset, block_k), :], mask=mask, other=0)
            ks = plgpu.load(ks_ref.at[page, head, pl.ds(offset, block_k)], mask=valid, other=0.0)
            k = lax.bitcast_convert_type(k, F8)
            if kmode == "fma":
                k = k.astype(jnp.float16).astype(jnp.float32)
                s = jnp.zeros((ROWS, block_k), jnp.float32)
                for g in range(GROUP):
                    qg = jnp.sum(jnp.where((row == g)[:, None], q, 0.0), axis=0)
                    s = jnp.where((row == g)[:, None], jnp.sum(qg[None, :] * k, axis=1)[None, :], s)
                return s * (ks * scale_log2)[None, :]
            s = _dot2(qd, k, True) / q_scale if kmode == "fp8" else plgpu.dot(qd, k.astype(jnp.float16), trans_b=True)
            return s * (ks * scale_log2)[None, :]

        def values(page, offset, valid, mask, p):
            """p [R, Bk] times the value tile -> a tuple of `parts` [R, H / parts] products."""
            if vmode == "bf16":
                v = plgpu.load(v_ref.at[page, head, pl.ds(offset, block_k), :], mask=mask, other=0.0)
                return (plgpu.dot(p.astype(jnp.bfloat16), v),)
            vs = plgpu.load(vs_ref.at[page, head, pl.ds(offset, block_k)], mask=valid, other=0.0)
            vmax = jnp.maximum(vs.max(), TINY)
            pv = p * (vs * (1.0 / vmax))[None, :]  # in [0, 1]
            if parts > 1:  # byte j of each word holds head dims j, j + parts, ...
                width = HEAD_DIM // parts
                word_mask = jnp.broadcast_to(valid[:, None], (block_k, width))
                words = plgpu.load(v_ref.at[page, head, pl.ds(offset, block_k), :], mask=word_mask, other=0)
                out = []
                for j in range(parts):
                    byte = (lax.shift_right_logical(words, words.dtype.type(8 * j)) if j else words).astype(jnp.uint8)
                    v = lax.bitcast_convert_type(byte, F8).astype(jnp.float16)
                    out.append(plgpu.dot(pv.astype(jnp.float16), v) * vmax)
                return tuple(out)
            if transposed:
                t_mask = jnp.broadcast_to(valid[None, :], (HEAD_DIM, block_k))
                ref = v_ref.at[page, head, :, pl.ds(offset, block_k)]
                v = jnp.where(t_mask, ref[...], 0) if unmasked_v else plgpu.load(ref, mask=t_mask, other=0)
            else:
                v = plgpu.load(v_ref.at[page, head, pl.ds(offset, block_k), :], mask=mask, other=0)
            v = lax.bitcast_convert_type(v, F8)
            if vmode.startswith("fp8"):
                pvd = _dot2(_split_e4m3(pv, 256.0), v, transposed) / 256.0
            else:
                pvd = plgpu.dot(pv.astype(jnp.float16), v.astype(jnp.float16), trans_b=transposed)
            return (pvd * vmax,)

        def values_fma(page, offset, valid, mask, p, alpha, acc):
            """The accumulators of the real rows (a tuple of GROUP), rescaled by alpha and plus p times the tile."""
            vs = plgpu.load(vs_ref.at[page, head, pl.ds(offset, block_k)], mask=valid, other=0.0)
            v = plgpu.load(v_ref.at[page, head, pl.ds(offset, block_k), :], mask=mask, other=0)
            v = lax.bitcast_convert_type(v, F8).astype(jnp.float16).astype(jnp.float32)
            pv = p * vs[None, :]
            out = []
            for g, a in enumerate(acc):
                pg = jnp.sum(jnp.where((row == g)[:, None], pv, 0.0), axis=0)
                ag = jnp.sum(jnp.where(row == g, alpha, 0.0))
                x = pg[:, None] * v
                out.append(a * ag + (x if vmode == "fma" else jnp.sum(x, axis=0)))
            return tuple(out)

        def body(i, carry):
            acc, m, l = carry
            start = i * block_k
            page = tables_ref[b, lax.div(start, PAGE)]
            offset = lax.rem(start, PAGE)
            valid = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0) < ctx
            mask = jnp.broadcast_to(valid[:, None], (block_k, HEAD_DIM))
            s = jnp.where(valid[None, :], scores(page, offset, valid, mask), MASK)
            m_next = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_next)
            p = jnp.exp2(s - m_next[:, None])
            l = l * alpha + p.sum(axis=1)
            if fma:
                return values_fma(page, offset, valid, mask, p, alpha, acc), m_next, l
            pvd = values(page, offset, valid, mask, p)
            return tuple(a * alpha[:, None] + x for a, x in zip(acc, pvd, strict=True)), m_next, l

        if fma:
            acc = (jnp.zeros((block_k, HEAD_DIM) if vmode == "fma" else (HEAD_DIM,), jnp.float32),) * GROUP
        else:
            acc = (jnp.zeros((ROWS, HEAD_DIM // parts), jnp.float32),) * parts
        init = (acc, jnp.full((ROWS,), MASK, jnp.float32), jnp.zeros((ROWS,), jnp.float32))
        acc, m, l = lax.fori_loop(0, pl.cdiv(ctx, block_k), body, init)
        if fma:
            for g, a in enumerate(acc):
                lg = jnp.sum(jnp.where(row == g, l, 0.0))
                o = jnp.sum(a, axis=0) if vmode == "fma" else a
                o = jnp.where(lg > 0, o / lg, 0.0).astype(o_ref.dtype)
                o_ref[b, head * GROUP + g, :] = o
            return
        # parts > 1: written as [part 0's head dims | part 1's | ...], put back in order outside
        width = HEAD_DIM // parts
        row_mask = jnp.broadcast_to((row < GROUP)[:, None], (ROWS, width))
        for j, a in enumerate(acc):
            o = jnp.where(l[:, None] > 0, a / l[:, None], 0.0).astype(o_ref.dtype)
            plgpu.store(o_ref.at[b, pl.ds(head * GROUP, ROWS), pl.ds(j * width, width)], o, mask=row_mask)

    return kernel


def attention(q, k, v, ks, vs, tables, lens, *, kmode, vmode, block_k, warps, stages):
    return pl.pallas_call(
        make_kernel(kmode, vmode, block_k),
        grid=(q.shape[0], KV_HEADS),
        in_specs=[pl.no_block_spec] * 7,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        name=f"probe_{kmode}_{vmode}",
        interpret=jax.default_backend() == "cpu",  # CPU: checks the variants, does not time them
    )(lens, tables, q, k, v, ks, vs)


def reference(q, k, v, tables, lens):
    """float32 attention on dequantized pages k, v [S, KV_HEADS, PAGE, HEAD_DIM]."""
    batch = q.shape[0]
    k = jnp.moveaxis(k[tables], 2, 1).reshape(batch, KV_HEADS, -1, HEAD_DIM)
    v = jnp.moveaxis(v[tables], 2, 1).reshape(batch, KV_HEADS, -1, HEAD_DIM)
    valid = jnp.arange(k.shape[2])[None, :] < lens[:, None]
    s = jnp.einsum("bkgh,bklh->bkgl", q.reshape(batch, KV_HEADS, GROUP, HEAD_DIM).astype(jnp.float32), k)
    s = jnp.where(valid[:, None, None, :], s * HEAD_DIM**-0.5, -jnp.inf)
    return jnp.einsum("bkgl,bklh->bkgh", jax.nn.softmax(s, axis=-1), v).reshape(batch, Q_HEADS, HEAD_DIM)


def kernel_us(fn, *args):
    from jax.experimental.mosaic.gpu import profiler

    _, times = profiler.measure(fn, iterations=10)(*args)
    return statistics.median(times) * 1e3


def caches(num_pages, views=True):
    """e4m3 K and V with per-row scales, as bytes and (`views`) bf16 (dequantized), transposed and grouped."""
    shape = (num_pages, KV_HEADS, PAGE, HEAD_DIM)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    k8 = jnp.clip(jax.random.normal(k1, shape) * 100, -440, 440).astype(F8)
    v8 = jnp.clip(jax.random.normal(k2, shape) * 100, -440, 440).astype(F8)
    ks = jax.random.uniform(k3, shape[:3], jnp.float32, 1e-3, 3e-3)
    vs = jax.random.uniform(k4, shape[:3], jnp.float32, 1e-3, 3e-3)
    kf, vf = k8.astype(jnp.float32) * ks[..., None], v8.astype(jnp.float32) * vs[..., None]
    ku, vu = lax.bitcast_convert_type(k8, jnp.uint8), lax.bitcast_convert_type(v8, jnp.uint8)
    if not views:
        return dict(k={"": ku}, v={"": vu}, ks=ks, vs=vs)
    v_modes = {"bf16": vf.astype(jnp.bfloat16), "T": jnp.swapaxes(vu, 2, 3), "": vu}
    for name, n in PARTS.items():
        v_modes[name] = lax.bitcast_convert_type(vu.reshape(*shape[:3], HEAD_DIM // n, n), getattr(jnp, f"uint{8 * n}"))
    return dict(k={"bf16": kf.astype(jnp.bfloat16), "": ku}, v=v_modes, ks=ks, vs=vs, kf=kf, vf=vf)


def probe_variants(args):
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes]
    num_pages = max(b * c // PAGE for b, c in shapes) + 1
    c = caches(num_pages)
    tilings = [tuple(map(int, t.split(":"))) for t in args.tilings]
    tilings += [(128, 4, 2), (64, 4, 2), (256, 4, 2)] if args.sweep else []
    rows = []
    for batch, ctx in shapes:
        rng = np.random.default_rng(0)
        width = ctx // PAGE
        tables = jnp.asarray(rng.permutation(num_pages - 1)[: batch * width].reshape(batch, width) + 1, jnp.int32)
        lens = jnp.asarray(rng.integers(ctx - 200, ctx + 1, batch), jnp.int32)
        q = jax.random.normal(jax.random.key(5), (batch, Q_HEADS, HEAD_DIM), jnp.bfloat16)
        want = np.asarray(reference(q, c["kf"], c["vf"], tables, lens))
        tokens = int(np.asarray(lens).sum())
        for variant in args.variants:
            kmode, vmode = variant.split(":")
            k = c["k"]["bf16" if kmode == "bf16" else ""]
            v = c["v"][vmode if vmode in c["v"] else ("T" if "T" in vmode else "")]
            nbytes = sum(tokens * KV_HEADS * (2 * HEAD_DIM if m == "bf16" else HEAD_DIM + 4) for m in (kmode, vmode))
            for block_k, warps, stages in tilings:
                kw = dict(kmode=kmode, vmode=vmode, block_k=block_k, warps=warps, stages=stages)
                name = f"{variant} {block_k} keys, {warps} warps, {stages} stages"
                fn = jax.jit(lambda *a, kw=kw: attention(*a, **kw))
                inputs = (q, k, v, c["ks"], c["vs"], tables, lens)
                try:
                    out = np.asarray(fn(*inputs), np.float32)
                    n = PARTS.get(vmode, 1)
                    out = out.reshape(batch, Q_HEADS, n, HEAD_DIM // n).swapaxes(-1, -2).reshape(out.shape)
                    err = float(np.max(np.abs(out - want)))
                    if jax.default_backend() == "cpu":
                        print(f"batch {batch} ctx {ctx} {name}: max err {err:.2g}", flush=True)
                        continue
                    us = kernel_us(fn, *inputs)
                except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
                    print(f"batch {batch} ctx {ctx} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append((batch, ctx, name, us, nbytes / us / 1e6, err))
                print("batch {} ctx {} {}: {:.1f} us {:.2f} TB/s, max err {:.2g}".format(*rows[-1]), flush=True)
    print("\n| batch | ctx | K:V, tiles | us | TB/s | % of 4.24 | max err |")
    for batch, ctx, name, us, tbs, err in rows:
        print(f"| {batch} | {ctx} | {name} | {us:.1f} | {tbs:.2f} | {100e12 * tbs / CEILING:.0f}% | {err:.2g} |")


def probe_tiles(batches, blocks):
    from nanovllm_jax.kernels import paged_decode_attention

    c = caches(max(batches) * 1024 // PAGE + 8, views=False)
    k, v, ks, vs = c["k"][""], c["v"][""], c["ks"], c["vs"]
    if blocks:  # only these key blocks x stages
        settings = [dict(block_k=int(b), num_stages=int(s)) for b, s in (x.split(":") for x in blocks)]
    else:
        settings = [
            {},
            dict(num_splits=2),
            dict(num_splits=4),
            dict(block_k=128, num_stages=2),
            dict(block_k=64, num_stages=2),
            dict(block_k=64, num_stages=3),
            dict(block_k=64, num_stages=4),
            dict(num_warps=8),
        ]
    rows = []
    for batch, ctx in ((b, 1024) for b in batches):
        width = ctx // PAGE
        rng = np.random.default_rng(0)
        tables = jnp.asarray(rng.permutation(k.shape[0])[: batch * width].reshape(batch, width), jnp.int32)
        lens = jnp.full((batch,), ctx, jnp.int32)
        q = jax.random.normal(jax.random.key(3), (batch, Q_HEADS, HEAD_DIM), jnp.bfloat16)
        nbytes = batch * ctx * KV_HEADS * 2 * (HEAD_DIM + 4)
        for kw in settings:
            fn = jax.jit(lambda q, t, n, kw=kw: paged_decode_attention(q, k, v, t, n, k_scale=ks, v_scale=vs, **kw))
            us = kernel_us(fn, q, tables, lens)
            rows.append((batch, ctx, str(kw or "default"), us, nbytes / us / 1e6))
            print("batch {} ctx {} {}: {:.1f} us {:.2f} TB/s".format(*rows[-1]), flush=True)
    print("\n| batch | ctx | settings | us | TB/s | % of 4.24 |")
    for batch, ctx, name, us, tbs in rows:
        print(f"| {batch} | {ctx} | {name} | {us:.1f} | {tbs:.2f} | {100e12 * tbs / CEILING:.0f}% |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["64:1024", "256:2048"], help="batch:context")
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="K:V read modes (module docstring)")
    p.add_argument("--tilings", nargs="+", default=["64:4:3", "128:4:3"], help="key block:warps:stages")
    p.add_argument("--sweep", action="store_true", help="also 128-key blocks 2 deep, 64 keys 2 deep, 256 keys")
    p.add_argument("--tiles", action="store_true", help="time the engine's kernel with other splits and tiles")
    p.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128, 256], help="--tiles: batches (ctx 1024)")
    p.add_argument("--blocks", nargs="+", default=[], help="--tiles: only these key blocks:stages, e.g. 64:3 128:2")
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    probe_tiles(args.batches, args.blocks) if args.tiles else probe_variants(args)


if __name__ == "__main__":
    main()
