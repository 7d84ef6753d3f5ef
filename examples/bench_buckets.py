"""Per-bucket step times of the ModelRunner: decode tok/s against the bandwidth floor, prefill tok/s.

Drives the ModelRunner directly with fake sequences (no scheduler): for every decode batch bucket B
at a few context lengths L, B sequences of L tokens each decode a window of `--window` tokens; for every
prefill token bucket T, fresh prompts of `--prefill-seq-len` tokens fill exactly T tokens.
Two times per generated token (decode: a window's time / its steps), medians over `--repeats`:
  run_ms     `ModelRunner.run`: every row joins afresh (host packing of the whole batch), transfer,
             the window, host read;
  device_ms  decode: the window in the engine's steady state (rows already on the device, nothing to
             update), launch to read; prefill: as run_ms.
The decode floor is what a step must read at the memory bandwidth: every weight once plus the K and V
of its B live sequences, step_floor = (weight_bytes + B * L * kv_bytes_per_token) / bandwidth.
Sequences get distinct KV blocks while the cache has them, then blocks are reused cyclically (the
reads still cost the same bytes; the JSON marks such rows `aliased`). The KV cache is filled with
random values first, so no step reads zeros.

Prints a table, writes PREFIX.json and PREFIX.png (matplotlib).

    python examples/bench_buckets.py                  # qwen3-0.6b on GPU, tiny on CPU
    python examples/bench_buckets.py --bandwidth measure --out /tmp/buckets
"""

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cached_checkpoint  # noqa: E402

# B/s: a torch device-to-device copy on the H200 (../shared/PERFORMANCE.md), the ceiling for the floor; JAX's
# own elementwise copy reaches less (`--bandwidth measure`), so it understates the floor.
H200_COPY_BANDWIDTH = 4.24e12


def decode_bytes(runner) -> tuple[int, int]:
    """(weight bytes, KV bytes per token of context) on one device: a decode step reads every weight once
    and the K and V (with their scales, for an 8-bit cache) of each live token."""
    import jax

    weight_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(runner.state))
    return weight_bytes, runner.cache_layout.block_bytes() // runner.block_size


def fake_sequences(
    num_seqs: int,
    num_tokens: int,
    decode: bool,
    block_size: int,
    num_blocks: int,
    vocab_size: int,
    first_block: int = 0,
    extra_tokens: int = 0,
):
    """`num_seqs` sequences of `num_tokens` tokens, ready for a decode step (all but the last token
    cached) or a fresh prefill of all their tokens. Returns (sequences, whether blocks were reused)."""
    from nanovllm_jax import SamplingParams
    from nanovllm_jax.engine.sequence import Sequence

    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1 << 20)
    per_seq = math.ceil((num_tokens + extra_tokens) / block_size)
    rng = random.Random(num_seqs * 100003 + num_tokens)
    seqs = []
    for i in range(num_seqs):
        seq = Sequence([rng.randrange(vocab_size) for _ in range(num_tokens)], params, block_size)
        seq.block_table = [(first_block + i * per_seq + j) % num_blocks for j in range(per_seq)]
        seq.num_cached_tokens = num_tokens - 1 if decode else 0
        seq.num_scheduled_tokens = 1 if decode else num_tokens
        seqs.append(seq)
    return seqs, num_seqs * per_seq > num_blocks


def time_run(runner, seqs, is_prefill: bool, warmup: int, repeats: int, window: int = 1) -> float:
    """Median seconds per generated token of `runner.run` (a prefill step, or a decode window)."""
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        runner.run(seqs, is_prefill, window)
        if i >= warmup:
            times.append((time.perf_counter() - t) / (1 if is_prefill else window))
    return statistics.median(times)


def time_steady(runner, seqs, warmup: int, repeats: int, window: int) -> float:
    """Median seconds per generated token of decode windows over rows already on the device."""
    runner.batch.clear()
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        runner.decode(seqs, [window] * len(seqs), window).read()
        if i >= warmup:
            times.append((time.perf_counter() - t) / window)
    return statistics.median(times)


def fill_kv_random(runner):
    """Random KV values, layer by layer in place (donated), so attention never reads zeros."""
    import jax

    fill = jax.jit(lambda c, k: jax.random.normal(k, c.shape, c.dtype), donate_argnums=0)
    key = jax.random.key(1)
    for i, (k, v) in enumerate(runner.kv_caches):
        runner.kv_caches[i] = (
            fill(k, jax.random.fold_in(key, 2 * i)),
            fill(v, jax.random.fold_in(key, 2 * i + 1)),
        )
    jax.block_until_ready(runner.kv_caches)


def measure_bandwidth(nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device copy bandwidth (bytes read + written per second) of an elementwise op over `nbytes`."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times)


def plot(result: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(13, 5))
    for i, ctx in enumerate(sorted({r["context"] for r in result["decode"]})):
        rows = [r for r in result["decode"] if r["context"] == ctx]
        batch = [r["batch"] for r in rows]
        ax_d.plot(batch, [r["tok_s"] for r in rows], "o-", color=f"C{i}", label=f"ctx {ctx}: engine step")
        if rows[0]["device_tok_s"] is not None:
            ax_d.plot(batch, [r["device_tok_s"] for r in rows], "x:", color=f"C{i}", label=f"ctx {ctx}: device")
        ax_d.plot(
            batch,
            [r["floor_tok_s"] for r in rows],
            "--",
            color=f"C{i}",
            alpha=0.6,
            label=f"ctx {ctx}: bandwidth floor",
        )
    ax_d.set(
        xscale="log",
        yscale="log",
        xlabel="decode batch bucket (sequences)",
        ylabel="output tok/s",
        title=f"decode, floor at {result['bandwidth'] / 1e12:.2f} TB/s",
    )
    ax_d.set_xticks(sorted({r["batch"] for r in result["decode"]}))
    ax_d.set_xticklabels([str(b) for b in sorted({r["batch"] for r in result["decode"]})])
    ax_d.xaxis.set_minor_formatter(NullFormatter())
    ax_d.grid(True, which="both", alpha=0.3)
    ax_d.legend(fontsize=7)
    tokens = [r["tokens"] for r in result["prefill"]]
    ax_p.plot(tokens, [r["tok_s"] for r in result["prefill"]], "o-", label="engine step")
    if result["prefill"] and result["prefill"][0]["device_tok_s"] is not None:
        ax_p.plot(tokens, [r["device_tok_s"] for r in result["prefill"]], "x:", label="device")
    ax_p.set(
        xscale="log",
        yscale="log",
        xlabel="prefill token bucket",
        ylabel="prompt tok/s",
        title=f"prefill ({result['prefill_seq_len']}-token prompts)",
    )
    ax_p.set_xticks(tokens)
    ax_p.set_xticklabels([str(t) for t in tokens], rotation=45)
    ax_p.xaxis.set_minor_formatter(NullFormatter())
    ax_p.grid(True, which="both", alpha=0.3)
    ax_p.legend(fontsize=7)
    fig.suptitle(f"{result['model_name']} on {result['device']} (jax {result['jax']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face Qwen3 directory (default: a random checkpoint of --size)")
    p.add_argument("--size", help="random checkpoint size without --model (default: qwen3-0.6b; tiny on CPU)")
    p.add_argument("--max-model-len", type=int, help="default 4096 (512 on CPU)")
    p.add_argument("--max-num-seqs", type=int, help="largest decode bucket; default 512 (16 on CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, help="largest prefill bucket; default 16384 (512 on CPU)")
    p.add_argument("--contexts", default="128,1024,4096", help="decode context lengths, clipped to max_model_len")
    p.add_argument("--prefill-seq-len", type=int, default=512, help="prompt length of the prefill steps")
    p.add_argument("--repeats", type=int, help="timed steps per point, median reported (default 20; 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--window", type=int, default=8, help="decode steps per window (the engine's decode_window)")
    p.add_argument("--batches", help="decode buckets to time, comma-separated (default: all)")
    p.add_argument(
        "--bandwidth",
        default=str(H200_COPY_BANDWIDTH),
        help="B/s for the floor, or 'measure' (JAX's 1 GiB device copy); default 4.24e12 (the H200's torch copy)",
    )
    p.add_argument("--out", default="bench_buckets", help="output prefix: PREFIX.json and PREFIX.png")
    p.add_argument("--num-kvcache-blocks", type=int, default=-1, help="default: sized from memory")
    p.add_argument("--no-fill", action="store_true", help="keep the zeroed KV cache (skips the random fill)")
    p.add_argument("--cache-dir", help="persistent compilation cache dir")
    args = p.parse_args()

    import jax

    from nanovllm_jax.engine.runtime import apply_runtime_defaults

    apply_runtime_defaults()  # the engine's XLA flags, before anything below starts JAX's backend
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from nanovllm_jax.config import Config
    from nanovllm_jax.engine.model_runner import ModelRunner

    on_cpu = jax.default_backend() == "cpu"
    defaults = (
        dict(size="tiny", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=512, repeats=5)
        if on_cpu
        else dict(size="qwen3-0.6b", max_model_len=4096, max_num_seqs=512, max_num_batched_tokens=16384, repeats=20)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model = args.model or cached_checkpoint(args.size)
    device = jax.devices()[0]
    if args.bandwidth == "measure" and on_cpu:
        sys.exit("--bandwidth measure needs a GPU; pass a number on CPU")

    t = time.perf_counter()
    config = Config(
        model,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        num_kvcache_blocks=args.num_kvcache_blocks,
        decode_window=args.window,
    )
    runner = ModelRunner(config, 0, ())
    startup = time.perf_counter() - t
    if not args.no_fill:
        fill_kv_random(runner)
    # Measured after the runner sized its KV cache, so this copy's buffers never shrink the cache.
    measured_bw = None if on_cpu else measure_bandwidth()
    bandwidth = measured_bw if args.bandwidth == "measure" else float(args.bandwidth)
    weight_bytes, kv_per_token = decode_bytes(runner)
    contexts = sorted({min(int(c), config.max_model_len) for c in args.contexts.split(",")})
    bs, nb = runner.block_size, runner.num_blocks
    print(f"jax {jax.__version__}, {device.device_kind}; model {model}")
    print(
        f"start-up {startup:.1f}s; weights {weight_bytes / 1e9:.3f} GB; KV {kv_per_token} B/token; "
        f"cache {nb} blocks of {bs}; bandwidth for the floor {bandwidth / 1e12:.3f} TB/s"
        + (f" (measured copy: {measured_bw / 1e12:.3f} TB/s)" if measured_bw else "")
    )
    result = dict(
        model=model,
        model_name=os.path.basename(model.rstrip("/")),
        device=device.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_per_token,
        bandwidth=bandwidth,
        measured_bandwidth=measured_bw,
        block_size=bs,
        num_kv_blocks=nb,
        max_model_len=config.max_model_len,
        repeats=args.repeats,
        prefill_seq_len=args.prefill_seq_len,
        decode=[],
        prefill=[],
    )

    print(
        f"\n{'ctx':>6} {'batch':>6} {'run ms':>9} {'device ms':>10} {'tok/s':>11} {'floor ms':>9} "
        f"{'floor tok/s':>12} {'of floor':>9}"
    )
    for ctx in contexts:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else runner.decode_buckets
        for b in batches:
            extra = (args.warmup + args.repeats + 1) * args.window  # the steady windows' new tokens
            seqs, aliased = fake_sequences(b, ctx, True, bs, nb, runner.vocab_size, extra_tokens=extra)
            run_s = time_run(runner, seqs, False, args.warmup, args.repeats, args.window)
            dev_s = time_steady(runner, seqs, args.warmup, args.repeats, args.window)
            floor_s = (weight_bytes + b * ctx * kv_per_token) / bandwidth
            row = dict(
                context=ctx,
                batch=b,
                run_ms=run_s * 1e3,
                device_ms=dev_s and dev_s * 1e3,
                tok_s=b / run_s,
                device_tok_s=dev_s and b / dev_s,
                floor_ms=floor_s * 1e3,
                floor_tok_s=b / floor_s,
                frac_of_floor=floor_s / run_s,
                aliased=aliased,
            )
            result["decode"].append(row)
            dev = f"{row['device_ms']:10.3f}" if dev_s else f"{'-':>10}"
            print(
                f"{ctx:6d} {b:6d} {row['run_ms']:9.3f} {dev} {row['tok_s']:11.0f} {row['floor_ms']:9.3f} "
                f"{row['floor_tok_s']:12.0f} {row['frac_of_floor']:8.1%}" + ("  (blocks reused)" if aliased else "")
            )

    print(f"\n{'tokens':>7} {'seqs':>5} {'run ms':>9} {'device ms':>10} {'tok/s':>11}")
    for tokens in runner.prefill_buckets:
        seq_len = max(1, min(args.prefill_seq_len, config.max_model_len, tokens))
        lengths = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        seqs = []
        for i, n in enumerate(lengths):  # distinct blocks per prompt, after those of the previous ones
            s, _ = fake_sequences(1, n, False, bs, nb, runner.vocab_size, first_block=i * math.ceil(seq_len / bs))
            seqs += s
        run_s = time_run(runner, seqs, True, args.warmup, args.repeats)
        dev_s = None
        row = dict(
            tokens=tokens,
            seqs=len(seqs),
            run_ms=run_s * 1e3,
            device_ms=dev_s and dev_s * 1e3,
            tok_s=tokens / run_s,
            device_tok_s=dev_s and tokens / dev_s,
        )
        result["prefill"].append(row)
        dev = f"{row['device_ms']:10.3f}" if dev_s else f"{'-':>10}"
        print(f"{tokens:7d} {len(seqs):5d} {row['run_ms']:9.3f} {dev} {row['tok_s']:11.0f}")

    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out + ".png")
    best = max(result["decode"], key=lambda r: r["tok_s"])
    print(f"\nwrote {args.out}.json and {args.out}.png")
    print(
        f"summary: {device.device_kind} {result['model_name']}: best decode {best['tok_s']:.0f} tok/s "
        f"(batch {best['batch']}, ctx {best['context']}, {best['frac_of_floor']:.0%} of floor); "
        f"best prefill {max(r['tok_s'] for r in result['prefill']):.0f} tok/s"
    )


if __name__ == "__main__":
    main()
