"""GPU kernel times from a JAX profiler trace: `trace(fn)` runs `fn` under the profiler and returns the time
and launch count of each kernel name, and every kernel event in start order. Shared by profile_step.py
(a few decode windows) and bench.py (`--profile-device`: the whole timed run)."""

import collections
import glob
import os
import tempfile
from dataclasses import dataclass, field

# Kernel name fragments -> the part of the model they belong to, for `by_part` (first match wins).
PARTS = (
    ("decode attention", ("paged_decode_attention", "decode_attention", "attention_merge")),
    ("prefill attention", ("prefill_attention", "mosaic_gpu")),
    ("decode qkv GEMM + q/k norm + RoPE + KV store", ("decode_matmul_qk_norm_rope_store",)),
    ("decode GEMM (gate/up + SiLU)", ("decode_matmul_silu_mul",)),
    ("decode GEMMs (qkv, o, down)", ("decode_matmul",)),
    ("RMSNorm (+ residual add)", ("rms_norm",)),
    ("q/k norm + RoPE + KV store", ("qk_norm_rope_store", "store_kv")),
    ("sampler", ("gumbel_argmax",)),
    ("XLA/cuBLAS GEMMs (LM head, prefill)", ("gemm", "nvjet", "xmma", "cutlass", "triton_", "matmul", "dot")),
)


@dataclass
class KernelTimes:
    ns: collections.Counter = field(default_factory=collections.Counter)  # name -> total ns
    count: collections.Counter = field(default_factory=collections.Counter)  # name -> launches
    events: list = field(default_factory=list)  # (start ns, duration ns, name)

    def busy_ns(self) -> int:
        return sum(self.ns.values())

    def by_part(self) -> collections.Counter:
        """Total ns per part of the model (`PARTS`), the rest as "other"."""
        parts = collections.Counter()
        for name, ns in self.ns.items():
            part = next((p for p, frags in PARTS if any(f in name for f in frags)), "other (XLA fusions, copies)")
            parts[part] += ns
        return parts


def trace(fn) -> tuple[object, KernelTimes]:
    """(fn(), the kernels it ran on the GPU's streams). Block on fn's result inside fn."""
    import jax
    from jax.profiler import ProfileData

    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    try:
        result = fn()
    finally:
        jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    times = KernelTimes()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                times.ns[ev.name] += ev.duration_ns
                times.count[ev.name] += 1
                times.events.append((ev.start_ns, ev.duration_ns, ev.name))
    times.events.sort()
    return result, times
