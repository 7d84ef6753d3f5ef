"""nano-vllm's bench workload split over N engine processes, without Ray: the data-parallel ceiling.

For machines where Ray cannot be installed. The workload is examples/bench.py's (`workload`), dealt
round-robin to N processes (multiprocessing, spawn); process i sees only its own `--tp` GPUs through
CUDA_VISIBLE_DEVICES (set before it imports JAX), builds its engine, runs one warm-up `generate` as
bench.py does, waits at a barrier for the others, then times `generate` on its share. Printed: each
process's start-up, time and throughput, and output tokens over the slowest process's time (all start
together after the barrier), beside the sum of the per-process throughputs.

Without --model, a random checkpoint is written to a cache folder (qwen3-0.6b on GPUs; on CPU a tiny
one, with 16 short sequences, each process running JAX on CPU).

    python examples/dp_processes.py --num-procs 2          # the full workload on 2 GPUs
    python examples/dp_processes.py --num-procs 2 --cpu    # CPU: tiny model, a small workload
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import add_workload_args, cached_checkpoint, fill_workload_defaults, workload, write_json  # noqa: E402


def visible_gpus() -> list[str]:
    """The GPUs this script may use: CUDA_VISIBLE_DEVICES if set, else every NVIDIA GPU nvidia-smi lists
    (the parent never starts JAX, so takes no GPU memory)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def worker(rank: int, devices: str | None, model: str, engine: dict, prompts, params, barrier, results):
    """One engine on `devices` (None: CPU): start-up, warm-up, barrier, then `generate` timed."""
    if devices is None:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    from nanovllm_jax import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model, **engine)
    startup = time.perf_counter() - t
    llm.model_runner.programs.wait()  # the background build (top-k/top-p programs) stays off the timed run
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    barrier.wait()
    start = time.time()
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    results.put(
        dict(
            rank=rank,
            devices=devices,
            startup_s=startup,
            start=start,
            time_s=elapsed,
            num_seqs=len(prompts),
            output_tokens=sum(sp.max_tokens for sp in params),
            generated_tokens=sum(len(o["token_ids"]) for o in outputs),
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--num-procs", type=int, default=2, help="engine processes, each on --tp GPUs")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of each process")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where GPUs are visible")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()

    gpus = [] if args.cpu else visible_gpus()
    num_gpus = len(gpus)
    on_gpu = num_gpus > 0
    if on_gpu and num_gpus < args.num_procs * args.tp:
        p.error(f"{args.num_procs} processes x tp={args.tp} need {args.num_procs * args.tp} GPUs; {num_gpus} visible")
    fill_workload_defaults(args, on_gpu)
    model = args.model or cached_checkpoint(args.size)  # written once, here, before any process reads it
    with open(os.path.join(model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len, vocab_size)
    engine = dict(
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tp,
        enforce_eager=args.enforce_eager,
    )
    where = f"{num_gpus} GPUs visible" if on_gpu else "CPU"
    print(f"{args.num_procs} processes x tp={args.tp} ({where}); model: {model}")

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.num_procs), ctx.Queue()
    procs = []
    for rank in range(args.num_procs):
        devices = ",".join(gpus[rank * args.tp : (rank + 1) * args.tp]) if on_gpu else None
        share = slice(rank, None, args.num_procs)  # round-robin: each share draws lengths from the same mix
        procs.append(
            ctx.Process(
                target=worker,
                args=(rank, devices, model, engine, prompts[share], params[share], barrier, results),
            )
        )
    t = time.perf_counter()
    for proc in procs:
        proc.start()
    reports = []
    while len(reports) < len(procs):  # a process that died would never report: stop waiting then
        try:
            reports.append(results.get(timeout=5))
        except Exception:  # queue.Empty
            dead = [proc for proc in procs if proc.exitcode not in (None, 0)]
            if dead:
                for proc in procs:
                    proc.kill()
                sys.exit(
                    f"process(es) {[procs.index(d) for d in dead]} failed (exit codes {[d.exitcode for d in dead]})"
                )
    wall = time.perf_counter() - t
    for proc in procs:
        proc.join()
    reports.sort(key=lambda r: r["rank"])
    for r in reports:
        print(
            f"process {r['rank']} (devices {r['devices'] or 'cpu'}): {r['num_seqs']} seqs, "
            f"{r['output_tokens']} tokens, "
            f"start-up {r['startup_s']:.2f}s, time {r['time_s']:.2f}s, {r['output_tokens'] / r['time_s']:.2f}tok/s"
        )
    total = sum(r["output_tokens"] for r in reports)
    generated = sum(r["generated_tokens"] for r in reports)
    if generated != total:
        print(f"WARNING: generated {generated} tokens, not {total} (a sequence reached max_model_len?)")
    slowest = max(r["time_s"] for r in reports)
    skew = max(r["start"] for r in reports) - min(r["start"] for r in reports)
    summed = sum(r["output_tokens"] / r["time_s"] for r in reports)
    print(f"Start skew after the barrier: {skew * 1e3:.1f} ms; sum of per-process throughputs: {summed:.2f}tok/s")
    print(f"Total: {total}tok, Time: {slowest:.2f}s, Throughput: {total / slowest:.2f}tok/s")
    print(
        f"summary: {'gpu' if on_gpu else 'cpu'} procs={args.num_procs} tp={args.tp} "
        f"{args.size if not args.model else os.path.basename(model.rstrip('/'))} seqs={args.num_seqs} "
        f"output_tokens={total} time={slowest:.2f}s throughput={total / slowest:.0f}tok/s wall={wall:.1f}s"
    )
    write_json(
        args.json,
        dict(
            model=model,
            size=None if args.model else args.size,
            device="gpu" if on_gpu else "cpu",
            num_procs=args.num_procs,
            tp=args.tp,
            num_seqs=args.num_seqs,
            max_input_len=args.max_input_len,
            max_output_len=args.max_output_len,
            output_tokens=total,
            generated_tokens=generated,
            time_s=slowest,
            throughput_tok_s=total / slowest,
            sum_of_process_throughputs_tok_s=summed,
            wall_s=wall,
            processes=reports,
        ),
    )


if __name__ == "__main__":
    main()
