"""Where a decode step's time goes: device busy time, kernel count and the top kernels, from a JAX
profiler trace of a few steps of the ModelRunner (GPU), against the step's floor: (every weight once +
batch x ctx tokens of K and V) / --bandwidth. Used to find the fixed per-step cost.

    python examples/profile_step.py --batch 1 64 256 --ctx 1024 [--kv-cache-dtype fp8]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cached_checkpoint  # noqa: E402
from bench_buckets import H200_COPY_BANDWIDTH, decode_bytes, fake_sequences  # noqa: E402
from device_trace import trace  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="windows traced")
    p.add_argument("--window", type=int, default=8, help="decode steps per window")
    p.add_argument("--sequence", type=int, default=0, help="also list the first N kernels of a step, in order")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="LLM kv_cache_dtype")
    p.add_argument("--reference-attention", action="store_true", help="jnp reference kernels instead of Pallas")
    p.add_argument("--bandwidth", type=float, default=H200_COPY_BANDWIDTH, help="B/s for the floor (H200: 4.24e12)")
    args = p.parse_args()

    from nanovllm_jax import LLM, kernels

    if args.reference_attention:
        kernels.store_kv = kernels.store_kv_reference
        kernels.paged_decode_attention = kernels.paged_decode_attention_reference
    llm = LLM(
        cached_checkpoint(args.size),
        max_num_seqs=max(args.batch),
        max_num_batched_tokens=512,
        max_model_len=4096,
        num_kvcache_blocks=2048,
        enforce_eager=True,
        decode_window=args.window,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    runner = llm.model_runner
    weight_bytes, kv_per_token = decode_bytes(runner)
    rows = []
    for batch in args.batch:
        extra = (2 * args.steps + 4) * args.window
        seqs, _ = fake_sequences(batch, args.ctx, True, runner.block_size, runner.num_blocks, 10000, extra_tokens=extra)
        runner.batch.clear()

        def run(seqs=seqs):  # a window over rows already on the device (the engine's steady state)
            return runner.decode(seqs, [args.window] * len(seqs), args.window).tokens

        for _ in range(3):
            run().block_until_ready()
        t = time.perf_counter()
        for _ in range(args.steps):
            out = run()
        out.block_until_ready()
        wall = (time.perf_counter() - t) / args.steps / args.window

        def traced():
            for _ in range(args.steps):
                out = run()
            out.block_until_ready()

        _, times = trace(traced)
        kernels_ns, count, events = times.ns, times.count, times.events
        steps = args.steps * args.window  # decode steps traced
        busy = times.busy_ns() / steps / 1e6
        n = sum(count.values()) / steps
        floor = (weight_bytes + batch * args.ctx * kv_per_token) / args.bandwidth * 1e3
        rows.append((batch, wall * 1e3, busy, n, floor))
        print(
            f"\nbatch {batch} ctx {args.ctx}: wall {wall * 1e3:.3f} ms/step, GPU busy {busy:.3f} ms/step, "
            f"{n:.0f} kernels/step, floor {floor:.3f} ms (busy {busy / floor:.2f}x the floor)"
        )
        for part, ns in times.by_part().most_common():
            print(f"  {ns / steps / 1e3:9.1f} us  {part}")
        print("  top kernels:")
        for name, ns in kernels_ns.most_common(12):
            print(f"  {ns / steps / 1e3:9.1f} us  x{count[name] / steps:5.0f}  {name[:90]}")
        if args.sequence:
            print(f"  the first {args.sequence} kernels of a step, in order (us):")
            for _, ns, name in events[: args.sequence]:
                print(f"    {ns / 1e3:7.1f}  {name[:100]}")
    print(f"\nctx {args.ctx}, floor at {args.bandwidth / 1e12:.2f} TB/s")
    print("| batch | wall ms/step | GPU busy ms/step | kernels/step | floor ms | busy / floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, wall, busy, n, floor in rows:
        print(f"| {batch} | {wall:.3f} | {busy:.3f} | {n:.0f} | {floor:.3f} | {busy / floor:.2f}x |")


if __name__ == "__main__":
    main()
