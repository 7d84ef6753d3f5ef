"""Kernel benchmarks on one GPU with Qwen3-0.6B's attention heads (16 q, 8 kv, head_dim 128, bf16, page 256).

Kernel time is taken inside one jitted `fori_loop` (the output feeds the next call's query, so nothing
is skipped and no dispatch is counted), rotating over enough distinct pages per call that the KV bytes
read exceed the 50 MB L2; the median of 5 timed runs. "call" is what one call costs from Python
(dispatch + `block_until_ready`). Bandwidth is KV bytes read / kernel time, against a measured copy.

    python -m nanovllm_jax.kernels.bench_kernels [--tune] [--skip-peer] [--out DIR]
"""

import argparse
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from nanovllm_jax.kernels import paged_decode_attention, paged_prefill_attention, store_kv

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 256
DTYPE = jnp.bfloat16
BATCHES = (1, 8, 64, 256, 512)
CONTEXTS = (128, 1024, 4096)
PREFILL_TOKENS = (2048, 4096, 8192, 16384)
ROTATE_BYTES = 128 << 20  # KV bytes touched per timed call, at least (2.5x the L2)
LOG = []


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


def median_time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth():
    """Bytes read + written per second by a large on-device elementwise pass (the practical ceiling)."""
    x = jax.random.normal(jax.random.key(0), (1 << 29,), DTYPE)  # 1 GiB
    n = 20
    f = jax.jit(lambda x: lax.fori_loop(0, n, lambda i, x: -x, x))
    return 2 * x.nbytes * n / median_time(f, x)


def loop_time(call, carry, consts, steps, target_s=0.03, est_s=1e-4):
    """Seconds per `call(carry, consts, *step) -> carry`, unrolled over the steps, inside a fori_loop.

    Arrays go in as arguments (`consts`, `steps`), never as closed-over constants.
    """
    n = max(2, int(target_s / (est_s * len(steps))))

    @jax.jit
    def many(carry, consts, steps):
        def body(_, c):
            for step in steps:
                c = call(c, consts, *step)
            return c

        return lax.fori_loop(0, n, body, carry)

    return median_time(many, carry, consts, steps) / (n * len(steps))


def call_time(fn, *args):
    """Median seconds of one call from Python (dispatch and sync included)."""
    return median_time(fn, *args, repeats=30)


class Pool:
    """One large random paged cache that every decode case draws distinct pages from."""

    def __init__(self, num_pages, peer_layout):
        shape = (num_pages, KV_HEADS, PAGE, HEAD_DIM)
        self.k = jax.random.normal(jax.random.key(1), shape, DTYPE)
        self.v = jax.random.normal(jax.random.key(2), shape, DTYPE)
        self.num_pages = num_pages
        # The peer wants [K, S, P, H].
        self.k_peer = self.k.transpose(1, 0, 2, 3) if peer_layout else None
        self.v_peer = self.v.transpose(1, 0, 2, 3) if peer_layout else None
        self.rng = np.random.default_rng(0)

    def tables(self, rotations, batch, width):
        pages = self.rng.choice(self.num_pages, rotations * batch * width, replace=False)
        return [jnp.asarray(t, jnp.int32) for t in pages.reshape(rotations, batch, width)]


def kv_bytes(batch, ctx):
    return batch * ctx * KV_HEADS * HEAD_DIM * 2 * jnp.dtype(DTYPE).itemsize


def decode_case(pool, batch, ctx, fn, peer=False):
    width = pl_cdiv(ctx, PAGE)
    nbytes = kv_bytes(batch, ctx)
    rotations = int(min(8, max(1, math.ceil(ROTATE_BYTES / nbytes)), pool.num_pages // (batch * width)))
    tables = pool.tables(rotations, batch, width)
    lens = jnp.full((batch,), ctx, jnp.int32)
    q = jax.random.normal(jax.random.key(3), (batch, Q_HEADS, HEAD_DIM), DTYPE)
    kc, vc = (pool.k_peer, pool.v_peer) if peer else (pool.k, pool.v)
    steps = tuple((t,) for t in tables)
    est = nbytes / 2.0e12 + 5e-6
    sec = loop_time(lambda q, c, t: fn(q, c[0], c[1], t, c[2]), q, (kc, vc, lens), steps, est_s=est)
    return sec, nbytes / sec, (q, kc, vc, tables[0], lens)


def pl_cdiv(a, b):
    return -(-a // b)


def ours(**kw):
    return functools.partial(paged_decode_attention, **kw)


def peer_fn(pages_per_compute_block, k_splits):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    def fn(q, k_pages, v_pages, tables, lens):
        return paged_attention(
            q,
            k_pages,
            v_pages,
            tables,
            lens,
            pages_per_compute_block=pages_per_compute_block,
            k_splits=k_splits,
        )

    return fn


def peer_variants(width):
    for k_splits in (1, 2, 4, 8, 16):
        if width % k_splits:
            continue
        for ppcb in (1, 2, 4):
            if (width // k_splits) % ppcb == 0:
                yield ppcb, k_splits


def tune_decode(pool, copy_bw):
    log("\n## decode tuning (us per call, % of copy bandwidth)")
    cases = [(1, 4096), (64, 1024), (256, 1024), (256, 4096), (512, 1024), (512, 4096)]
    variants = [dict(block_k=bk, num_warps=w, num_stages=s) for bk in (64, 128, 256) for w in (4, 8) for s in (2, 3)]
    for batch, ctx in cases:
        splits = (8, 16) if batch == 1 else (1, 2)
        for kw in [dict(v, num_splits=n) for v in variants for n in splits]:
            try:
                sec, bw, _ = decode_case(pool, batch, ctx, ours(**kw))
                log(f"decode B={batch} ctx={ctx} {kw}: {sec * 1e6:.1f} us {100 * bw / copy_bw:.0f}%")
            except Exception as e:  # noqa: BLE001 (a variant that fails to compile is reported, not fatal)
                log(f"decode B={batch} ctx={ctx} {kw}: FAILED {type(e).__name__}: {str(e)[:200]}")
    for batch, ctx, splits_list in [(1, 4096, (4, 8, 16, 32)), (8, 4096, (1, 2, 4, 8))]:
        for splits in splits_list:
            sec, bw, _ = decode_case(pool, batch, ctx, ours(num_splits=splits))
            log(f"decode B={batch} ctx={ctx} splits={splits}: {sec * 1e6:.1f} us {100 * bw / copy_bw:.0f}%")


def decode_table(pool, copy_bw, with_peer):
    log("\n## decode attention (ours, default tuning)")
    rows = []
    for batch in BATCHES:
        for ctx in CONTEXTS:
            sec, bw, args = decode_case(pool, batch, ctx, ours())
            row = dict(batch=batch, ctx=ctx, us=sec * 1e6, tbps=bw / 1e12, pct=100 * bw / copy_bw)
            if (batch, ctx) in ((1, 4096), (64, 1024), (512, 4096)):
                row["call_us"] = call_time(jax.jit(paged_decode_attention), *args) * 1e6
            if with_peer:
                best = None
                for ppcb, ks in peer_variants(pl_cdiv(ctx, PAGE)):
                    try:
                        psec, pbw, _ = decode_case(pool, batch, ctx, peer_fn(ppcb, ks), peer=True)
                    except Exception as e:  # noqa: BLE001
                        log(f"peer B={batch} ctx={ctx} ppcb={ppcb} ks={ks}: FAILED {type(e).__name__}")
                        continue
                    if best is None or psec < best[0]:
                        best = (psec, pbw, ppcb, ks)
                if best:
                    row.update(peer_us=best[0] * 1e6, peer_pct=100 * best[1] / copy_bw, peer_cfg=best[2:])
                    row["speedup"] = best[0] / sec
            rows.append(row)
            log(json.dumps(row))
    return rows


def prefill_inputs(total, rng, pool_pages=None):
    lens = []
    while sum(lens) < total:
        lens.append(int(512 + rng.integers(0, 128)))
    lens[-1] -= sum(lens) - total
    width = max(pl_cdiv(n, PAGE) for n in lens)
    num_pages = len(lens) * width
    shape = (num_pages, KV_HEADS, PAGE, HEAD_DIM)
    kc = jax.random.normal(jax.random.key(5), shape, DTYPE)
    vc = jax.random.normal(jax.random.key(6), shape, DTYPE)
    tables = jnp.asarray(rng.permutation(num_pages).reshape(len(lens), width), jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    ctx = jnp.asarray(lens, jnp.int32)
    q = jax.random.normal(jax.random.key(7), (total, Q_HEADS, HEAD_DIM), DTYPE)
    flops = sum(4 * Q_HEADS * HEAD_DIM * n * (n + 1) // 2 for n in lens)  # causal pairs counted once
    return q, kc, vc, tables, cu, ctx, flops, len(lens)


def prefill_case(total, **kw):
    q, kc, vc, tables, cu, ctx, flops, nseq = prefill_inputs(total, np.random.default_rng(total))
    fn = functools.partial(paged_prefill_attention, **kw)
    call = lambda q, c: fn(q, *c)
    sec = loop_time(call, q, (kc, vc, tables, cu, ctx), ((),), est_s=flops / 3e14)
    return sec, flops / sec, nseq


def tune_prefill():
    log("\n## prefill tuning (T=8192)")
    variants = [(128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 4, 2)]
    group = Q_HEADS // KV_HEADS
    for rows, bk, w, s in variants:
        kw = dict(block_q=rows // group, block_k=bk, num_warps=w, num_stages=s)  # (the Triton kernel's tuning)
        try:
            sec, fl, _ = prefill_case(8192, **kw)
            log(f"prefill rows={rows} {kw}: {sec * 1e6:.0f} us {fl / 1e12:.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            log(f"prefill rows={rows} {kw}: FAILED {type(e).__name__}: {str(e)[:300]}")


def work_list_time(total):
    """The jnp pass that builds the prefill work list (part of the prefill time above)."""
    from nanovllm_jax.kernels.prefill_attention import _work_list

    _, _, _, _, cu, ctx, _, _ = prefill_inputs(total, np.random.default_rng(total))
    call = lambda cu, c: cu.at[-1].set(jnp.maximum(cu[-1], _work_list(cu, c[0], total, 64)[:, 2].max()))
    return loop_time(call, cu, (ctx,), ((),), est_s=2e-5) * 1e6


def prefill_table():
    log("\n## prefill attention, default tuning: backend 'auto' (Mosaic GPU on Hopper for bf16) and 'triton'")
    rows = []
    for total in PREFILL_TOKENS:
        for backend in ("auto", "triton"):
            sec, fl, nseq = prefill_case(total, backend=backend)
            row = dict(tokens=total, seqs=nseq, backend=backend, us=sec * 1e6, tflops=fl / 1e12)
            if backend == "triton":  # (the Triton kernel's work list; the Mosaic one's is in its own time)
                row["work_list_us"] = work_list_time(total)
            rows.append(row)
            log(json.dumps(row))
    return rows


def prefill_mgpu_table(tokens=None, variants=None):
    """The Mosaic GPU prefill kernel (prefill_attention_mgpu.py) beside the Triton one, same inputs."""
    from nanovllm_jax.kernels.prefill_attention_mgpu import paged_prefill_attention_mgpu

    log("\n## prefill attention: Mosaic GPU kernel vs Triton kernel (TFLOP/s, causal FLOPs counted once)")
    variants = variants or [
        dict(),  # the entry's defaults (block_kv=64, num_stages=3, no ping-pong barrier)
        dict(block_kv=64, num_stages=4),
        dict(block_kv=64, num_stages=3, use_schedule_barrier=True),
        dict(block_kv=128, num_stages=2),
    ]
    rows = []
    for total in tokens or PREFILL_TOKENS:
        q, kc, vc, tables, cu, ctx, flops, nseq = prefill_inputs(total, np.random.default_rng(total))
        row = dict(tokens=total, seqs=nseq)
        for name, fn in [("triton", functools.partial(paged_prefill_attention, backend="triton"))] + [
            (
                "mgpu " + (",".join(f"{k}={v}" for k, v in kw.items()) or "default"),
                functools.partial(paged_prefill_attention_mgpu, **kw),
            )
            for kw in variants
        ]:
            try:
                sec = loop_time(lambda q, c, fn=fn: fn(q, *c), q, (kc, vc, tables, cu, ctx), ((),), est_s=flops / 3e14)
                row[name] = round(flops / sec / 1e12, 1)
                row[name + " us"] = round(sec * 1e6, 1)
            except Exception as e:  # noqa: BLE001 (a variant that fails to compile is reported, not fatal)
                row[name] = f"FAILED {type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        log(json.dumps(row))
    return rows


def store_bench(pool):
    log("\n## KV store, 512 tokens into the pool cache, in place (caches donated)")
    rng = np.random.default_rng(9)
    slots = jnp.asarray(rng.choice(pool.num_pages * PAGE, 512, replace=False), jnp.int32)
    k = jax.random.normal(jax.random.key(8), (512, KV_HEADS, HEAD_DIM), DTYPE)
    v = -k
    n = 200

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def many(k_cache, v_cache, k, v, slots):
        return lax.fori_loop(0, n, lambda i, c: store_kv(c[0], c[1], k, v, slots), (k_cache, v_cache))

    kc, vc = jax.block_until_ready(many(pool.k, pool.v, k, v, slots))
    pool.k = pool.v = None
    loops, calls = [], []
    for _ in range(5):
        t = time.perf_counter()
        kc, vc = jax.block_until_ready(many(kc, vc, k, v, slots))
        loops.append((time.perf_counter() - t) / n)
    for _ in range(30):  # from Python: the public entry donates the caches
        t = time.perf_counter()
        kc, vc = jax.block_until_ready(store_kv(kc, vc, k, v, slots))
        calls.append(time.perf_counter() - t)
    pool.k, pool.v = kc, vc
    row = dict(
        tokens=512,
        cache_gb=2 * kc.nbytes / 1e9,
        kernel_us=statistics.median(loops) * 1e6,
        call_us=statistics.median(calls) * 1e6,
    )
    log(json.dumps(row))
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true", help="sweep block sizes / warps / stages / splits")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-tables", action="store_true")
    parser.add_argument("--tune-prefill", action="store_true", help="sweep the prefill kernel only")
    parser.add_argument("--skip-decode", action="store_true", help="tables: prefill (and store) only")
    parser.add_argument("--pool-pages", type=int, default=8192, help="pages of the shared cache (4.3 GB)")
    parser.add_argument("--quick", action="store_true", help="batches 1, 8 and contexts 128, 1024 only")
    parser.add_argument("--prefill-mgpu", action="store_true", help="only the Mosaic GPU vs Triton prefill table")
    parser.add_argument("--prefill-tokens", default="", help="with --prefill-mgpu: packed token counts (8192,16384)")
    parser.add_argument("--mgpu-variants", default="all", help="with --prefill-mgpu: 'default' or 'all' tunings")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {now}")
    if args.prefill_mgpu:
        tokens = tuple(int(t) for t in args.prefill_tokens.split(",")) if args.prefill_tokens else None
        variants = [dict()] if args.mgpu_variants == "default" else None
        rows = prefill_mgpu_table(tokens, variants)
        with open(os.path.join(args.out, "bench_prefill_mgpu.json"), "w") as f:
            json.dump(rows, f, indent=1)
        for r in rows:
            print(" | ".join(f"{k}={v}" for k, v in r.items() if not k.endswith(" us")))
        return
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    global BATCHES, CONTEXTS, PREFILL_TOKENS
    if args.quick:
        BATCHES, CONTEXTS, PREFILL_TOKENS = (1, 8), (128, 1024), (1024,)
    pool = Pool(args.pool_pages, peer_layout=not (args.skip_peer or args.skip_tables or args.skip_decode))
    results = dict(copy_tbps=copy_bw / 1e12)
    if args.tune:
        tune_decode(pool, copy_bw)
    if args.tune or args.tune_prefill:
        tune_prefill()
    if not args.skip_tables:
        if not args.skip_decode:
            results["decode"] = decode_table(pool, copy_bw, with_peer=not args.skip_peer)
        results["prefill"] = prefill_table()
    results["store"] = store_bench(pool)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "bench_kernels.log"), "w") as f:
        f.write("\n".join(LOG))
    if "decode" in results:
        print("\n| batch | ctx | ours us | TB/s | % copy | call us | peer us | peer % | peer cfg | speedup |")
        for r in results["decode"]:
            print(
                f"| {r['batch']} | {r['ctx']} | {r['us']:.1f} | {r['tbps']:.2f} | {r['pct']:.0f}% | "
                f"{r.get('call_us', float('nan')):.0f} | {r.get('peer_us', float('nan')):.1f} | "
                f"{r.get('peer_pct', float('nan')):.0f}% | {r.get('peer_cfg', '')} | "
                f"{r.get('speedup', float('nan')):.2f} |"
            )
    for r in results.get("prefill", []):
        print(f"prefill T={r['tokens']} ({r['seqs']} seqs) {r['backend']}: {r['us']:.0f} us, {r['tflops']:.0f} TFLOP/s")
    print(f"store: {results['store']}")


if __name__ == "__main__":
    main()
