"""What a tensor-parallel decode window costs the host: a synthetic window (8 steps x 28 layers, two
row-parallel matmuls and two all-reduces per layer, Qwen3-0.6B sizes) under `shard_map` on --tp GPUs.

Prints the wall time per call when calls are queued back to back (what the host can sustain: launches
only, the GPU work is small) and when each call is waited for (launch + GPU + sync). XLA flags are read
at start-up, so compare settings by running the script once per setting, e.g.

    python examples/collectives_probe.py --tp 2
    XLA_FLAGS="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false" python examples/collectives_probe.py --tp 2
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="rows per step (the decode batch)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--steps", type=int, default=8, help="decode steps per call (the window)")
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()

    from nanovllm_jax.engine.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        from jax import shard_map
    except ImportError:  # older jax
        from jax.experimental.shard_map import shard_map

    devices = np.array(jax.devices()[: args.tp])
    mesh = Mesh(devices, ("tp",))
    d, f = 1024, 3072  # hidden size, MLP width (Qwen3-0.6B)
    key = jax.random.key(0)
    w_in = jax.random.normal(key, (args.layers, d, f), jnp.bfloat16) * 0.02  # column-parallel: f sharded
    w_out = jax.random.normal(key, (args.layers, f, d), jnp.bfloat16) * 0.02  # row-parallel: f sharded
    w_in = jax.device_put(w_in, NamedSharding(mesh, P(None, None, "tp")))
    w_out = jax.device_put(w_out, NamedSharding(mesh, P(None, "tp", None)))
    x = jax.device_put(jnp.ones((args.tokens, d), jnp.bfloat16), NamedSharding(mesh, P()))

    def window(x, w_in, w_out):
        def step(_, x):
            for layer in range(args.layers):
                for _half in range(2):  # attention's o projection and the MLP's down projection
                    h = jax.nn.silu(x @ w_in[layer]) @ w_out[layer]
                    x = x + jax.lax.psum(h, "tp")
            return x

        return jax.lax.fori_loop(0, args.steps, step, x)

    fn = jax.jit(shard_map(window, mesh=mesh, in_specs=(P(), P(None, None, "tp"), P(None, "tp", None)), out_specs=P()))
    t = time.perf_counter()
    jax.block_until_ready(fn(x, w_in, w_out))
    first = time.perf_counter() - t
    for _ in range(3):
        jax.block_until_ready(fn(x, w_in, w_out))
    t = time.perf_counter()
    for _ in range(args.calls):
        y = fn(x, w_in, w_out)
    jax.block_until_ready(y)
    queued = (time.perf_counter() - t) / args.calls
    synced = []
    for _ in range(args.calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, w_in, w_out))
        synced.append(time.perf_counter() - t)
    flags = os.environ.get("XLA_FLAGS", "")
    print(
        f"tp {args.tp} tokens {args.tokens}: first call {first:.2f} s, queued {queued * 1e3:.2f} ms/call, "
        f"synced {np.median(synced) * 1e3:.2f} ms/call ({args.steps} steps x {args.layers} layers x 2 all-reduces)"
        f" | XLA_FLAGS={flags}"
    )


if __name__ == "__main__":
    main()
