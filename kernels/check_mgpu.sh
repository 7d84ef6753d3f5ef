#!/usr/bin/env bash
# The Mosaic GPU prefill kernel on the device machine (H100): a compile smoke test, its GPU tests, and the
# Mosaic GPU vs Triton prefill table (2k/4k/8k/16k packed tokens, Qwen3-0.6B heads). Run from the repo root:
#
#     bash kernels/check_mgpu.sh [all|smoke|tests|bench|perf|dump|ncu]
#
# Stage time limits (seconds): SMOKE_S (240), TESTS_S (300), BENCH_S (400), NCU_S (150); BENCH_TOKENS picks the
# packed token counts (bench: 2048,4096,8192,16384; perf: 8192,16384), BENCH_VARIANTS=all adds the tuning
# variants to the bench table, PERF_ALL=1 to the perf breakdown, PERF_PROFILE=1 adds a profiled call.
#
# Full logs go to $OUT (the device tool's output folder; ./mgpu_out elsewhere); a short summary prints last.
set -o pipefail
MODE=${1:-all}
OUT=${OUT:-./mgpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || export PYTHONPATH=$PWD
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$OUT/env.log"

summary=()

if [[ $MODE == all || $MODE == smoke ]]; then
  timeout "${SMOKE_S:-240}" python3 - >"$OUT/smoke.log" 2>&1 <<'EOF'
import time, numpy as np, jax, jax.numpy as jnp
from nanovllm_jax.kernels import paged_prefill_attention_reference as ref_fn
from nanovllm_jax.kernels.prefill_attention_mgpu import paged_prefill_attention_mgpu as fn
rng = np.random.default_rng(0)
lens = [600, 1, 77]
cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
kc = jnp.asarray(rng.standard_normal((8, 8, 256, 128)), jnp.bfloat16)
vc = jnp.asarray(rng.standard_normal((8, 8, 256, 128)), jnp.bfloat16)
tables = jnp.asarray([[3, 1, 6], [0, 2, 4], [5, 7, 2]], jnp.int32)
ctx = jnp.asarray([600, 300, 77], jnp.int32)
q = jnp.asarray(rng.standard_normal((sum(lens) + 4, 16, 128)), jnp.bfloat16)
t = time.time()
out = jax.block_until_ready(fn(q, kc, vc, tables, cu, ctx))
print(f"compiled+ran in {time.time() - t:.1f}s")
ref = ref_fn(q, kc, vc, tables, cu, ctx)
o, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
print("nan:", np.isnan(o).any(), "rel err:", np.abs(o - r).max() / np.abs(r).max(), "pad rows zero:", (o[-4:] == 0).all())
EOF
  rc=$?
  summary+=("smoke rc=$rc: $(tail -n 1 "$OUT/smoke.log" | cut -c1-300)")
  if [[ $rc != 0 ]]; then
    echo "---- smoke failed, tail of $OUT/smoke.log ----"
    grep -v '^\s*$' "$OUT/smoke.log" | tail -n 60 | cut -c1-400
  fi
fi

if [[ $MODE == all || $MODE == tests ]]; then
  timeout "${TESTS_S:-300}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/test_kernels_mgpu.py \
    >"$OUT/tests.log" 2>&1
  summary+=("tests: $(tail -n 1 "$OUT/tests.log")")
  grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | cut -c1-300 | head -n 20
fi

if [[ $MODE == all || $MODE == bench ]]; then
  timeout "${BENCH_S:-400}" python3 -m nanovllm_jax.kernels.bench_kernels --prefill-mgpu --out "$OUT" \
    --prefill-tokens "${BENCH_TOKENS:-2048,4096,8192,16384}" --mgpu-variants "${BENCH_VARIANTS:-default}" \
    >"$OUT/bench.log" 2>&1
  summary+=("bench rc=$?")
  grep -E '^tokens=' "$OUT/bench.log" | cut -c1-600
fi

if [[ $MODE == perf ]]; then
  # Breakdown at BENCH_TOKENS: the work list alone, the kernel alone, the whole entry, per tuning; then one
  # profiled call (Mosaic GPU's profiler, named scopes per warpgroup) summarized per region.
  timeout "${BENCH_S:-400}" python3 - "${BENCH_TOKENS:-8192,16384}" >"$OUT/perf.log" 2>&1 <<'EOF'
import collections, functools, glob, json, os, sys
import numpy as np, jax, jax.numpy as jnp
from nanovllm_jax.kernels import bench_kernels as bk
from nanovllm_jax.kernels import prefill_attention_mgpu as M
from nanovllm_jax.kernels.prefill_attention import paged_prefill_attention

out_dir = os.environ.get("OUT", ".")
variants = [(64, 3, False), (64, 4, False), (64, 3, True), (128, 2, True), (128, 2, False)]
if not os.environ.get("PERF_ALL"):  # the default tuning only
    variants = variants[:1]
programs = M._num_sms()
for total in map(int, sys.argv[1].split(",")):
    q, kc, vc, tables, cu, ctx, flops, nseq = bk.prefill_inputs(total, np.random.default_rng(total))
    est = flops / 3e14
    tf = lambda sec: f"{flops / sec / 1e12:.1f}"
    sec = bk.loop_time(lambda q, c: paged_prefill_attention(q, *c), q, (kc, vc, tables, cu, ctx), ((),), est_s=est)
    print(f"T={total} seqs={nseq} triton: {sec * 1e6:.1f} us {tf(sec)} TFLOP/s", flush=True)
    for bkv, stages, sched in variants:
        kw = dict(block_kv=bkv, num_stages=stages, use_schedule_barrier=sched)
        name = f"bkv={bkv} S={stages} sched={int(sched)}"
        try:
            wl = functools.partial(M._work_list, num_tokens=total, tile=64, num_kv_heads=8, block_kv=bkv,
                                   num_programs=programs)
            work, bounds = wl(cu, ctx)
            wl_sec = bk.loop_time(lambda cu, c: cu + jnp.minimum(wl(cu, c[0])[1][0], 0), cu, (ctx,), ((),), est_s=2e-5)
            call = lambda q, c: M._kernel_call(c[0], c[1], c[2], q, c[3], c[4], scale=128**-0.5,
                                               num_programs=programs, **kw)
            k_sec = bk.loop_time(call, q, (work, bounds, tables, kc, vc), ((),), est_s=est)
            full = lambda q, c: M.paged_prefill_attention_mgpu(q, *c, **kw)
            f_sec = bk.loop_time(full, q, (kc, vc, tables, cu, ctx), ((),), est_s=est)
            print(f"T={total} {name}: entry {f_sec * 1e6:.1f} us {tf(f_sec)} TFLOP/s | kernel {k_sec * 1e6:.1f} us"
                  f" {tf(k_sec)} TFLOP/s | work list {wl_sec * 1e6:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"T={total} {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)

# One profiled call at the last size (PERF_PROFILE=1).
if not os.environ.get("PERF_PROFILE"):
    sys.exit(0)
prof = os.path.join(out_dir, "prof")
os.makedirs(prof, exist_ok=True)
bkv, stages = 64, 3
work, bounds = M._work_list(cu, ctx, total, 64, 8, bkv, programs)
try:
    o = M._kernel_call(work, bounds, tables, q, kc, vc, scale=128**-0.5, block_kv=bkv, num_stages=stages,
                       num_programs=programs, use_schedule_barrier=True, profile_dir=prof, profile_space=640)
    jax.block_until_ready(o)
    jax.effects_barrier()
    files = sorted(glob.glob(os.path.join(prof, "*.json")))
    events = json.load(open(files[-1]))["traceEvents"]
    per_tid = collections.defaultdict(list)
    for ev in events:
        per_tid[ev["tid"]].append(ev)
    totals = collections.defaultdict(lambda: collections.defaultdict(float))
    spans = collections.defaultdict(list)
    for tid, evs in per_tid.items():
        role = ["compute0", "compute1", "memory"][(tid - 1) % 3]
        stack = []
        for ev in evs:
            if ev["ph"] == "B":
                stack.append(ev)
            else:
                b = stack.pop()
                totals[role][b["name"]] += ev["ts"] - b["ts"]
        spans[role].append(evs[-1]["ts"] - evs[0]["ts"])
    ncta = len(per_tid) // 3
    print(f"profile T={total} bkv={bkv} S={stages}: {ncta} programs, trace {files[-1]}")
    for role in sorted(totals):
        sp = np.asarray(spans[role])
        print(f"  {role}: busy span mean {sp.mean():.1f} us, max {sp.max():.1f}, min {sp.min():.1f}")
        for name, t in sorted(totals[role].items(), key=lambda x: -x[1]):
            print(f"    {name:12s} {t / ncta:8.1f} us per program")
except Exception as e:  # noqa: BLE001
    import traceback
    traceback.print_exc()
    print(f"profile FAILED {type(e).__name__}: {str(e)[:400]}")
EOF
  summary+=("perf rc=$?")
  grep -E "^(T=|profile|  )" "$OUT/perf.log" | cut -c1-300
fi

if [[ $MODE == dump ]]; then
  # ptxas resource report, PTX and SASS of the compiles (bkv=64 with 3 stages, bkv=128 with 2), in $OUT/dump.tgz.
  mkdir -p /tmp/mgpu_dump
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=/tmp/mgpu_dump \
    timeout "${SMOKE_S:-240}" python3 - >"$OUT/dump.log" 2>&1 <<'EOF'
import numpy as np, jax
from nanovllm_jax.kernels import bench_kernels as bk
from nanovllm_jax.kernels import prefill_attention_mgpu as M
q, kc, vc, tables, cu, ctx, flops, nseq = bk.prefill_inputs(2048, np.random.default_rng(0))
for bkv, stages in [(64, 3), (128, 2)]:
    jax.block_until_ready(M.paged_prefill_attention_mgpu(q, kc, vc, tables, cu, ctx, block_kv=bkv, num_stages=stages))
print("compiled")
EOF
  summary+=("dump rc=$?: $(ls /tmp/mgpu_dump | wc -l) files")
  tar czf "$OUT/dump.tgz" -C /tmp mgpu_dump
  grep -ihE "registers|spill|stack frame" "$OUT/dump.log" /tmp/mgpu_dump/* 2>/dev/null | head -n 20 | cut -c1-300
fi

if [[ $MODE == ncu ]]; then
  # Nsight Compute on one kernel-only call at 8k tokens (stall reasons, pipes), then JAX's own FA3 kernel
  # (attention_mgpu, f16, dense batches) timed for comparison.
  cat >/tmp/ncu_one.py <<'EOF'
import numpy as np, jax
from nanovllm_jax.kernels import bench_kernels as bk
from nanovllm_jax.kernels import prefill_attention_mgpu as M
q, kc, vc, tables, cu, ctx, flops, nseq = bk.prefill_inputs(8192, np.random.default_rng(8192))
work, bounds = M._work_list(cu, ctx, 8192, 64, 8, 64, M._num_sms())
f = jax.jit(lambda w, b, t, q, k, v: M._kernel_call(w, b, t, q, k, v, scale=128**-0.5, block_kv=64, num_stages=3,
                                                     num_programs=M._num_sms(), use_schedule_barrier=True))
for _ in range(2):
    jax.block_until_ready(f(work, bounds, tables, q, kc, vc))
EOF
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  timeout "${NCU_S:-150}" "$NCU" --kernel-name regex:mosaic --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section SourceCounters python3 /tmp/ncu_one.py >"$OUT/ncu.txt" 2>&1
  summary+=("ncu rc=$?")
  grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|Stall|stall|Warp Cycles|Issued Ipc|Issue Slots|No Eligible|Active Warps|Eligible Warps|Executed Ipc|Pipe|Tensor" "$OUT/ncu.txt" | head -n 60 | cut -c1-200
  timeout 120 python3 - >"$OUT/fa3.log" 2>&1 <<'EOF'
import functools, jax, jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention_mgpu as am
from nanovllm_jax.kernels import bench_kernels as bk
for causal in (False, True):
    for seq, bkv in ((1024, 128), (4096, 128)):
        b = 16384 // seq
        q = jax.random.normal(jax.random.key(0), (b, seq, 16, 128), jnp.float16)
        k = jax.random.normal(jax.random.key(1), (b, seq, 8, 128), jnp.float16)
        cfg = am.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, causal=causal)
        fn = functools.partial(am.attention, config=cfg)
        flops = 4 * b * seq * seq * 16 * 128 // (2 if causal else 1)
        try:
            sec = bk.loop_time(lambda q, c: fn(q, c[0], c[1]), q, (k, k), ((),), est_s=flops / 4e14)
            print(f"attention_mgpu causal={causal} batch={b} seq={seq} bkv={bkv}: {sec * 1e6:.1f} us {flops / sec / 1e12:.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            print(f"attention_mgpu causal={causal} seq={seq}: FAILED {type(e).__name__}: {str(e)[:300]}")
EOF
  cat "$OUT/fa3.log" | grep attention_mgpu
fi

echo "==== summary"
printf '%s\n' "${summary[@]}"
