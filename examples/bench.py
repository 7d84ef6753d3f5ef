"""nano-vllm's throughput benchmark, reproduced exactly: 256 random prompts, sampled output lengths.

The workload (as nano-vllm's bench.py): `random.seed(0)`; for each of 256 sequences a prompt of
`randint(100, 1024)` token ids drawn from `randint(0, 10000)`; then, for each sequence in turn,
`max_tokens = randint(100, 1024)` with `temperature=0.6, ignore_eos=True`. The engine is
`LLM(model, enforce_eager=False, max_model_len=4096)`, other settings default; one warm-up
`generate` runs before the timed one. Throughput = sum of max_tokens / wall time of `generate`
(133,966 output tokens, 142,827 prompt tokens).

Without --model, the published Qwen3-0.6B architecture with random bf16 weights is written to a cache
folder (reused on later runs); the cost equals real weights because `ignore_eos=True`. On CPU the
defaults shrink to a run of about a minute (tiny checkpoint, 16 short sequences); every default can be
overridden. Start-up (weight load, KV cache allocation, compilation of every bucket) is timed
separately: until `LLM(...)` returns, and until the programs it builds in the background (top-k/top-p
sampling) are built too; the timed run starts after both. `--startup-only --cache-dir DIR` measures a cold
(fresh DIR) or warm persistent compilation cache.

    python examples/bench.py                        # the exact workload on GPU
    python examples/bench.py --startup-only --cache-dir /tmp/xla-cold
"""

import argparse
import json
import os
import random
import shutil
import sys
import time

CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_jax")


def cached_checkpoint(size: str, dtype: str | None = None, root: str = CACHE_ROOT) -> str:
    """A random Qwen3 checkpoint of `size` in `root`, written once (atomically) and reused after."""
    from nanovllm_jax.utils.checkpoint import make_checkpoint

    dtype = dtype or ("float32" if size.startswith("tiny") else "bfloat16")
    path = os.path.join(root, f"random-{size}-{dtype}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = f"{path}.tmp-{os.getpid()}"
        print(f"writing a random {size} ({dtype}) checkpoint to {path} ...", flush=True)
        make_checkpoint(tmp, size, dtype)
        try:
            os.replace(tmp, path)  # config.json is only ever seen complete with its weights
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# The workload and engine settings without a flag: nano-vllm's bench on GPUs, a run of about a minute on CPU.
FULL = dict(
    size="qwen3-0.6b",
    num_seqs=256,
    max_input_len=1024,
    max_output_len=1024,
    max_num_seqs=512,
    max_num_batched_tokens=16384,
)
SMALL = dict(
    size="tiny", num_seqs=16, max_input_len=128, max_output_len=64, max_num_seqs=64, max_num_batched_tokens=2048
)


def add_workload_args(p: argparse.ArgumentParser):
    """The model, workload and engine-size flags that bench.py, dp_processes.py and ray_batch.py share."""
    p.add_argument("--model", help="a Hugging Face Qwen3 directory (default: a random checkpoint of --size)")
    p.add_argument("--size", help="random checkpoint size without --model (default: qwen3-0.6b; tiny on CPU)")
    p.add_argument("--num-seqs", type=int, help="default 256 (16 on CPU)")
    p.add_argument("--max-input-len", type=int, help="default 1024 (128 on CPU)")
    p.add_argument("--max-output-len", type=int, help="default 1024 (64 on CPU)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, help="engine default 512 (64 on CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, help="engine default 16384 (2048 on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="compile each bucket on first use, not at start-up")


def fill_workload_defaults(args, on_gpu: bool):
    """Every flag of `add_workload_args` left unset takes FULL's value on GPUs, SMALL's on CPU."""
    for name, default in (FULL if on_gpu else SMALL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def workload(num_seqs: int, max_input_len: int, max_output_len: int, vocab_size: int, min_len: int = 100):
    """nano-vllm's draw order: every prompt (length, then its ids), then every max_tokens.

    Token ids are `randint(0, 10000)` as in nano-vllm; only a vocabulary smaller than that (the tiny
    test checkpoints) lowers the upper bound; a maximum length below `min_len` lowers the minimum to it.
    """
    from nanovllm_jax import SamplingParams

    random.seed(0)
    top_id = min(10000, vocab_size - 1)
    prompts = [
        [random.randint(0, top_id) for _ in range(random.randint(min(min_len, max_input_len), max_input_len))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(
            temperature=0.6,
            ignore_eos=True,
            max_tokens=random.randint(min(min_len, max_output_len), max_output_len),
        )
        for _ in range(num_seqs)
    ]
    return prompts, params


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--cache-dir", help="persistent compilation cache dir (default: the engine's, or JAX's setting)")
    p.add_argument("--startup-only", action="store_true", help="build the LLM, print its start-up time, and exit")
    p.add_argument(
        "--sync", action="store_true", help="turn async scheduling off (each step scheduled after the last is read)"
    )
    p.add_argument("--decode-window", type=int, default=8, help="decode steps per device call (LLM decode_window)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="LLM kv_cache_dtype")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--profile-host", help="profile the timed run's Python (cProfile) and write the stats here")
    p.add_argument(
        "--profile-device",
        action="store_true",
        help="trace the timed run's GPU kernels (JAX profiler) and print where the device time went (slows the run)",
    )
    args = p.parse_args()

    import jax

    from nanovllm_jax.engine.runtime import apply_runtime_defaults

    apply_runtime_defaults()  # the engine's XLA flags, before anything below starts JAX's backend
    if args.cache_dir:  # before the LLM is built, so the engine keeps it instead of its default
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from nanovllm_jax import LLM, SamplingParams

    fill_workload_defaults(args, on_gpu=jax.default_backend() != "cpu")
    model = args.model or cached_checkpoint(args.size)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {jax.default_backend()}: {jax.device_count()} x {device.device_kind}")
    print(f"model: {model}" + ("" if args.model else f" (random {args.size} weights)"))

    t = time.perf_counter()
    llm = LLM(
        model,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tp,
        enforce_eager=args.enforce_eager,
        decode_window=args.decode_window,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    startup = time.perf_counter() - t
    runner = llm.model_runner
    runner.programs.wait()  # the top-k/top-p programs, built in the background: off the timed run's host
    all_built = time.perf_counter() - t
    phases = runner.startup_s | {f"programs_{k}": v for k, v in runner.programs.precompile_s.items()}
    print(
        f"Start-up: {startup:.2f}s (weights, KV cache of {runner.num_blocks} blocks ({args.kv_cache_dtype}), "
        f"programs without top-k/top-p), {all_built:.2f}s until all {len(runner.programs)} compiled programs "
        f"were built ({runner.programs.loaded_from_disk} loaded from disk; compilation cache "
        f"{jax.config.jax_compilation_cache_dir})\n"
        f"Start-up phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items())
    )
    result = dict(
        model=model,
        size=None if args.model else args.size,
        backend=jax.default_backend(),
        device=device.device_kind,
        jax=jax.__version__,
        tp=args.tp,
        startup_s=startup,
        all_programs_built_s=all_built,
        num_kv_blocks=runner.num_blocks,
        compiled_programs=len(runner.programs),
        loaded_programs=runner.programs.loaded_from_disk,
        startup_phases_s=phases,
        cache_dir=jax.config.jax_compilation_cache_dir,
    )
    if args.startup_only:
        print(
            f"summary: startup={startup:.2f}s all_programs={all_built:.2f}s programs={len(runner.programs)} "
            f"cache_dir={jax.config.jax_compilation_cache_dir}"
        )
        write_json(args.json, result)
        return

    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len, runner.vocab_size)
    llm.async_scheduling = not args.sync
    llm.generate(["Benchmark: "], SamplingParams())
    # The host's share: time spent waiting for a step's tokens (the device is busy then) vs the rest.
    before = dict(llm.stats)
    profile = None
    if args.profile_host:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    t = time.perf_counter()
    if args.profile_device:
        from device_trace import trace

        outputs, kernel_times = trace(lambda: llm.generate(prompts, params, use_tqdm=False))
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    if profile is not None:
        import pstats

        profile.disable()
        with open(args.profile_host, "w") as f:
            pstats.Stats(profile, stream=f).sort_stats("tottime").print_stats(40)
        print(f"host profile (timed run, cProfile adds overhead) in {args.profile_host}")
    stats = {k: v - before[k] for k, v in llm.stats.items()}
    wait, steps = stats["device_wait_s"], stats["decode_steps"]
    total = sum(sp.max_tokens for sp in params)
    prompt_tokens = sum(map(len, prompts))
    generated = sum(len(o["token_ids"]) for o in outputs)
    if generated != total:  # ignore_eos: only max_model_len can cut a sequence short
        print(f"WARNING: generated {generated} tokens, not {total} (a sequence reached max_model_len?)")
    throughput = total / elapsed
    if args.profile_device:
        print_device_time(kernel_times, elapsed)
    print(f"Total: {total}tok, Time: {elapsed:.2f}s, Throughput: {throughput:.2f}tok/s")
    print(
        f"Decode steps: {steps} in {stats['windows']} windows (decode_window={args.decode_window}), waiting for "
        f"the device {wait:.2f}s, host work {elapsed - wait:.2f}s ({(elapsed - wait) / steps * 1e3:.3f} ms per "
        f"decode step), async scheduling {'off' if args.sync else 'on'}"
    )
    result |= dict(
        num_seqs=args.num_seqs,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        max_model_len=llm.config.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        prompt_tokens=prompt_tokens,
        output_tokens=total,
        generated_tokens=generated,
        time_s=elapsed,
        throughput_tok_s=throughput,
        async_scheduling=not args.sync,
        decode_window=args.decode_window,
        kv_cache_dtype=args.kv_cache_dtype,
        decode_steps=steps,
        windows=stats["windows"],
        wait_s=wait,
        host_ms_per_decode_step=(elapsed - wait) / steps * 1e3,
    )
    write_json(args.json, result)
    print(
        f"summary: {jax.default_backend()} {device.device_kind} tp={args.tp} "
        f"{args.size if not args.model else os.path.basename(model.rstrip('/'))} seqs={args.num_seqs} "
        f"prompt_tokens={prompt_tokens} output_tokens={total} time={elapsed:.2f}s "
        f"throughput={throughput:.0f}tok/s startup={startup:.1f}s async={not args.sync} "
        f"window={args.decode_window} host_ms_per_step={(elapsed - wait) / steps * 1e3:.3f}"
    )


def print_device_time(times, elapsed: float):
    """The traced run's GPU busy time by part of the model and its largest kernels (`--profile-device`)."""
    busy = times.busy_ns() / 1e9
    if not busy:
        print("no GPU kernels in the trace (--profile-device times GPU kernels only)")
        return
    print(f"GPU busy {busy:.3f} s of the run's {elapsed:.3f} s (traced; the profiler slows the run), by part:")
    for part, ns in times.by_part().most_common():
        print(f"  {ns / 1e9:7.3f} s  {ns / 1e9 / busy:6.1%}  {part}")
    print("largest kernels:")
    for name, ns in times.ns.most_common(20):
        print(f"  {ns / 1e9:7.3f} s  x{times.count[name]:7d}  {name[:100]}")


def write_json(path: str | None, result: dict):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
