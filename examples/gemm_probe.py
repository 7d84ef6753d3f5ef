"""Decode-step GEMMs on one GPU: XLA's own matmul against the project's Pallas decode GEMM
(`kernels.gemm`: its default tiling, "auto", and a grid of tilings and K splits) and, with --mosaic, JAX's
Mosaic GPU Hopper matmul (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`), on a decoder layer's four
weight shapes at decode batch sizes. Kernel time from CUPTI (`mosaic.gpu.profiler.measure`), over 16 distinct
weight arrays per call so the weights come from HBM, not L2; bandwidth = weight + activation bytes / time.
Split-K tilings write float32 partial sums (the consumer adds them; that sum is not timed here).

    python examples/gemm_probe.py --rows 16 64 256 [--grid] [--hidden 4096 --intermediate 12288 --heads 32 8 128]
"""

import argparse
import itertools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from nanovllm_jax.kernels import gemm as mm

COPIES = 16
SILU_MUL = (mm.matmul_silu_mul_reference, mm.matmul_silu_mul)


def layer_shapes(hidden, intermediate, q_heads, kv_heads, head_dim):
    """(name, K, N) of the qkv, o, gate_up and down projections."""
    return [
        ("qkv", hidden, (q_heads + 2 * kv_heads) * head_dim),
        ("o", q_heads * head_dim, hidden),
        ("gate_up", hidden, 2 * intermediate),
        ("down", intermediate, hidden),
    ]


def kernel_us(fn, *args):
    from jax.experimental.mosaic.gpu import profiler

    _, times = profiler.measure(fn, iterations=10)(*args)
    return statistics.median(times) * 1e3 / COPIES


def pallas_tilings(m, k, n):
    """Small batches: row tiles of all rows up to 64, many K splits; from 128 rows: 64 or 128-row tiles, 4 or
    8 warps, 3 stages (128 x 128 tiles 4 stages deep exceed shared memory)."""
    if m <= 64:
        grid = itertools.product((min(m, 64),), (32, 64, 128), (1, 2, 4, 8), (4,), (4,))
    else:
        grid = itertools.product((64, 128), (64, 128), (1, 2, 4), (4, 8), (3,))
    tilings = [mm.Tiling(bm, bn, 128, s, warps, stages) for bm, bn, s, warps, stages in grid]
    return [t for t in tilings if t.fits(m, k, n)]


def mosaic_fns(args_rows):
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    configs = [
        hm.TuningConfig(
            tile_m=64, tile_n=tn, tile_k=64, max_concurrent_steps=4, wg_dimension=wg, epi_tile_n=64, epi_tile_m=64
        )
        for tn, wg in itertools.product((64, 128), (hm.MatmulDimension.N, hm.MatmulDimension.M))
    ]
    return hm, configs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--heads", type=int, nargs=3, default=[16, 8, 128], help="q heads, kv heads, head dim")
    p.add_argument("--xla-only", action="store_true", help="time XLA alone (to compare XLA_FLAGS settings)")
    p.add_argument("--grid", action="store_true", help="also time a grid of tilings (else XLA and auto only)")
    p.add_argument("--only", nargs="+", help="these projections only (qkv, o, gate_up, down)")
    p.add_argument("--mosaic", action="store_true", help="also time the Mosaic GPU Hopper matmul")
    args = p.parse_args()
    rows_out = []
    for name, k, n in layer_shapes(args.hidden, args.intermediate, *args.heads):
        if args.only and name not in args.only:
            continue
        # Separate arrays, not slices of one stacked array (a slice can cost XLA a copy kernel).
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(COPIES)]
        for m in args.rows:
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
            nbytes = k * n * 2 + m * k * 2 + m * n * 2

            @jax.jit
            def xla(x, ws):
                return [mm.matmul_reference(x, ws[i]) for i in range(COPIES)]

            ref = np.asarray(xla(x, ws)[0], np.float32)
            results = [("xla", kernel_us(xla, x, ws))]
            auto = mm.default_tiling(m, k, n, mm.MAX_SPLIT_K)
            candidates = (
                [(f"pallas {t}", t) for t in pallas_tilings(m, k, n)] if args.grid and not args.xla_only else []
            )
            if not args.xla_only and auto.fits(m, k, n) and m <= mm.MAX_ROWS:
                candidates.insert(0, (f"auto {auto}", auto))
            for label, t in candidates:

                @jax.jit
                def pal(x, ws, t=t):
                    return [mm.matmul_partials(x, ws[i], tiling=t) for i in range(COPIES)]

                try:
                    out = np.asarray(pal(x, ws)[0], np.float32)
                    out = out.sum(0) if t.split_k > 1 else out
                    err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-6))
                    if err > 2e-2:
                        print(f"  {name} m={m} {label}: WRONG (rel err {err:.3g})", flush=True)
                        continue
                    results.append((label, kernel_us(pal, x, ws)))
                except Exception as e:  # noqa: BLE001 - a probe reports each failing tiling and goes on
                    print(f"  {name} m={m} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            if args.mosaic and m >= 64:
                hm, configs = mosaic_fns(m)
                for cfg in configs:

                    @jax.jit
                    def mg(x, ws, cfg=cfg, hm=hm):
                        return [hm.matmul(x, ws[i], None, cfg) for i in range(COPIES)]

                    try:
                        mg(x, ws)
                        results.append((f"mosaic {cfg.tile_m}x{cfg.tile_n} wg{cfg.wg_dimension}", kernel_us(mg, x, ws)))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} m={m} mosaic: {type(e).__name__}: {str(e)[:120]}", flush=True)
            for label, us in sorted(results, key=lambda r: r[1])[:6]:
                print(f"  {name} m={m}: {us:8.2f} us {nbytes / us / 1e6:5.2f} TB/s  {label}", flush=True)
            best = min(results[1:], key=lambda r: r[1], default=("none", float("nan")))
            auto_us = next((us for label, us in results if label.startswith("auto")), float("nan"))
            rows_out.append((name, m, k, n, results[0][1], auto_us, best[0], best[1], nbytes))
            if name == "gate_up" and not args.xla_only:  # with the activation: XLA's dot + fusion vs one kernel
                times = [kernel_us(jax.jit(lambda x, ws, f=f: [f(x, w) for w in ws]), x, ws) for f in SILU_MUL]
                print(f"  gate_up+silu m={m}: xla {times[0]:.2f} us, kernel {times[1]:.2f} us", flush=True)
                gated = [("auto", times[1])]
                for t in pallas_tilings(m, k, n // 2) if args.grid else []:
                    if t.split_k == 1:
                        fn = jax.jit(lambda x, ws, t=t: [mm.matmul_silu_mul(x, w, tiling=t) for w in ws])
                        try:
                            gated.append((f"pallas {t}", kernel_us(fn, x, ws)))
                        except Exception as e:  # noqa: BLE001 - e.g. a tiling over the shared memory
                            print(f"  gate_up+silu m={m} {t}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                for label, us in sorted(gated, key=lambda r: r[1])[:4]:
                    print(f"  gate_up+silu m={m}: {us:8.2f} us  {label}", flush=True)
                best = min(gated, key=lambda r: r[1])
                rows_out.append(("gate_up+silu", m, k, n, times[0], times[1], *best, nbytes))
    print("\n| GEMM | rows | K x N | XLA us (TB/s) | auto us (TB/s) | best other | us (TB/s) |")
    print("|---|---:|---|---:|---:|---|---:|")
    for name, m, k, n, xla_us, auto_us, best_name, best_us, nbytes in rows_out:
        xla, auto, best = (f"{us:.2f} ({nbytes / us / 1e6:.2f})" for us in (xla_us, auto_us, best_us))
        print(f"| {name} | {m} | {k} x {n} | {xla} | {auto} | {best_name} | {best} |")


if __name__ == "__main__":
    main()
