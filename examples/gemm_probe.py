"""Decode-step GEMMs on one GPU: XLA's own matmul against JAX's Mosaic GPU Hopper matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) at a few tilings, on a decoder layer's four weight
shapes at decode batch sizes. Kernel time from CUPTI (`mosaic.gpu.profiler.measure`), over 16 distinct
weight copies per call so the weights come from HBM, not L2; bandwidth = weight + activation bytes / time.

    python examples/gemm_probe.py --rows 64 256 --hidden 1024 --intermediate 3072 --heads 16 8 128
"""

import argparse
import itertools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

COPIES = 16


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--heads", type=int, nargs=3, default=[16, 8, 128], help="q heads, kv heads, head dim")
    args = p.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    configs = [
        hm.TuningConfig(
            tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=s, wg_dimension=wg, epi_tile_n=64, epi_tile_m=64
        )
        for tm, tn, s, wg in itertools.product((64, 128), (64, 128), (4,), (hm.MatmulDimension.N, hm.MatmulDimension.M))
    ]
    rows_out = []
    for name, k, n in layer_shapes(args.hidden, args.intermediate, *args.heads):
        ws = jax.random.normal(jax.random.key(1), (COPIES, k, n), jnp.bfloat16)
        for m in args.rows:
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
            nbytes = k * n * 2 + m * k * 2 + m * n * 2

            @jax.jit
            def xla(x, ws):
                return [x @ ws[i] for i in range(COPIES)]

            ref = np.asarray(xla(x, ws)[0], np.float32)
            results = [("xla", kernel_us(xla, x, ws))]
            for cfg in configs:

                @jax.jit
                def mg(x, ws, cfg=cfg):
                    return [hm.matmul(x, ws[i], None, cfg) for i in range(COPIES)]

                try:
                    out = np.asarray(mg(x, ws)[0], np.float32)
                    err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-6))
                    if err > 2e-2:
                        print(f"  {name} m={m} {cfg}: WRONG (rel err {err:.3g})", flush=True)
                        continue
                    results.append(
                        (
                            f"mgpu {cfg.tile_m}x{cfg.tile_n} s{cfg.max_concurrent_steps} wg{cfg.wg_dimension}",
                            kernel_us(mg, x, ws),
                        )
                    )
                except Exception as e:  # noqa: BLE001 - a probe reports each failing tiling and goes on
                    print(f"  {name} m={m} {cfg.tile_m}x{cfg.tile_n}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            best = min(results[1:], key=lambda r: r[1], default=("none", float("nan")))
            xla_us = results[0][1]
            print(
                f"{name} m={m} k={k} n={n}: xla {xla_us:.2f} us ({nbytes / xla_us / 1e6:.2f} TB/s), "
                f"best {best[0]} {best[1]:.2f} us ({nbytes / best[1] / 1e6:.2f} TB/s)",
                flush=True,
            )
            rows_out.append((name, m, k, n, xla_us, best[0], best[1], nbytes))
    print("\n| GEMM | rows | K x N | XLA us (TB/s) | best Mosaic GPU tiling | us (TB/s) |")
    print("|---|---:|---|---:|---|---:|")
    for name, m, k, n, xla_us, best_name, best_us, nbytes in rows_out:
        print(
            f"| {name} | {m} | {k} x {n} | {xla_us:.2f} ({nbytes / xla_us / 1e6:.2f}) | {best_name} | "
            f"{best_us:.2f} ({nbytes / best_us / 1e6:.2f}) |"
        )


if __name__ == "__main__":
    main()
