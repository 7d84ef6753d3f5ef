"""nano-vllm's bench workload spread over N engine replicas with Ray Data (data parallelism).

The workload is examples/bench.py's (`workload`: seeded random token-id prompts and output lengths,
`temperature=0.6, ignore_eos=True`); its rows go through `nanovllm_jax.integrations.ray_data` with one
engine per replica, each reserving `--tp` GPUs (one CPU each on a cluster without GPUs). Each replica
builds its engine and runs one warm-up `generate` (as bench.py does) before its first batch. Printed at
the end: output tokens over the wall time of the whole job (replica start-up included), over the span
from the first batch's start to the last batch's end (start-up excluded: comparable to bench.py), and
each replica's rows, tokens and busy time.

Without --model, a random checkpoint is written to a cache folder (qwen3-0.6b on GPUs; on CPU a tiny
one, with 16 short sequences: a minute or two). Connects to a running Ray cluster with --address;
otherwise starts a local one.

    python examples/ray_batch.py --num-replicas 2                 # the full workload on 2 GPUs
    python examples/ray_batch.py --num-replicas 2 --num-seqs 32   # CPU: tiny model, a small workload
"""

import argparse
import json
import math
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import add_workload_args, cached_checkpoint, fill_workload_defaults, workload, write_json  # noqa: E402

from nanovllm_jax import SamplingParams  # noqa: E402
from nanovllm_jax.integrations.ray_data import LLMPredictor, run_ray_data  # noqa: E402


class TimedPredictor(LLMPredictor):
    """The integration's transform, warmed up once, adding each batch's replica and wall-clock span."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        num_rows = len(out["error"])
        return out | {"replica": [self.replica] * num_rows, "batch_start": [start] * num_rows,
                      "batch_end": [time.time()] * num_rows}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--num-replicas", type=int, default=2, help="engines, each on --tp GPUs (or one CPU)")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of each replica")
    p.add_argument("--batch-size", type=int, help="rows per engine call (default: an equal share per replica)")
    p.add_argument("--address", help="a Ray cluster to connect to (default: start a local one)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()

    import ray
    import ray.data

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(include_dashboard=False)
    on_gpu = ray.cluster_resources().get("GPU", 0) >= args.tp
    fill_workload_defaults(args, on_gpu)
    model = args.model or cached_checkpoint(args.size)
    with open(os.path.join(model, "config.json")) as f:  # the driver never starts JAX (nor takes a GPU)
        vocab_size = json.load(f)["vocab_size"]
    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len, vocab_size)
    batch_size = args.batch_size or math.ceil(len(prompts) / args.num_replicas)
    rows = [{"id": i, "prompt_token_ids": prompt} | vars(sp) for i, (prompt, sp) in enumerate(zip(prompts, params))]
    dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size))
    resources = ray.cluster_resources()
    print(
        f"ray {ray.__version__}: {resources.get('GPU', 0):.0f} GPUs, {resources.get('CPU', 0):.0f} CPUs; "
        f"{args.num_replicas} replicas x tp={args.tp} on {'GPU' if on_gpu else 'CPU'}, batches of {batch_size} rows"
    )
    print(f"model: {model}" + ("" if args.model else f" (random {args.size} weights)"))

    t = time.perf_counter()
    out = run_ray_data(
        model,
        dataset,
        num_replicas=args.num_replicas,
        batch_size=batch_size,
        device="gpu" if on_gpu else "cpu",
        predictor_cls=TimedPredictor,
        use_tqdm=True,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tp,
        enforce_eager=args.enforce_eager,
    )
    wall = time.perf_counter() - t
    errors = [row for row in out if row["error"]]
    if errors:
        print(f"WARNING: {len(errors)} rows failed, e.g. {errors[0]['error']}")
    assert [row["id"] for row in out] == list(range(len(prompts))), "rows lost, repeated or out of order"
    total = sum(sp.max_tokens for sp in params)
    generated = sum(len(row["generated_token_ids"]) for row in out)
    if generated != total:
        print(f"WARNING: generated {generated} tokens, not {total} (a sequence reached max_model_len?)")
    span = max(row["batch_end"] for row in out) - min(row["batch_start"] for row in out)
    replicas = {}
    for row in out:
        stats = replicas.setdefault(str(row["replica"]), dict(rows=0, tokens=0, batches=set()))
        stats["rows"] += 1
        stats["tokens"] += len(row["generated_token_ids"])
        stats["batches"].add((row["batch_start"], row["batch_end"]))
    for name, stats in sorted(replicas.items()):
        busy = sum(end - start for start, end in stats["batches"])
        print(
            f"replica {name}: {stats['rows']} rows, {stats['tokens']} tokens, {len(stats['batches'])} batches, "
            f"busy {busy:.2f}s ({stats['tokens'] / busy:.0f} tok/s)"
        )
        stats["busy_s"] = busy
        del stats["batches"]
    print(f"Generation span (first batch start to last batch end): {span:.2f}s, {total / span:.2f}tok/s")
    print(f"Total: {total}tok, Time: {wall:.2f}s, Throughput: {total / wall:.2f}tok/s (replica start-up included)")
    write_json(
        args.json,
        dict(
            model=model,
            size=None if args.model else args.size,
            ray=ray.__version__,
            device="gpu" if on_gpu else "cpu",
            num_replicas=args.num_replicas,
            tp=args.tp,
            batch_size=batch_size,
            num_seqs=args.num_seqs,
            max_input_len=args.max_input_len,
            max_output_len=args.max_output_len,
            output_tokens=total,
            generated_tokens=generated,
            wall_s=wall,
            throughput_wall_tok_s=total / wall,
            span_s=span,
            throughput_span_tok_s=total / span,
            replicas=replicas,
        ),
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
