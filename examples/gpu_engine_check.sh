#!/usr/bin/env bash
# The engine on the GPU (device tool): install, the engine tests with the Pallas kernels (fp32 tiny
# checkpoints at full matmul precision, so greedy tokens must equal HF's), the TP tests where there are
# several GPUs, then nano-vllm's bench.
# Logs go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# The engine's own XLA defaults (command buffers) are set at import, after pytest's conftest has started
# JAX; pass them here so the tests run the GPU exactly as the engine does.
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" \
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q -x tests/test_engine.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/engine_tests.log" | tail -5
# Tensor parallelism on every visible GPU (TP sizes above the GPU count are skipped).
if [ "$(nvidia-smi -L | grep -c '^GPU ')" -ge 2 ]; then
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" \
  NCCL_NVLS_ENABLE=0 timeout 300 python3 -m pytest -q tests/test_tensor_parallel.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/tp_tests.log" | tail -3
fi
# Cold start-up in a fresh compilation cache, then the warm one.
rm -rf /tmp/xla-fresh
timeout 420 python3 examples/bench.py --cache-dir /tmp/xla-fresh --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" \
  | grep -v "it/s" | grep -v cuda_timer
timeout 240 python3 examples/bench.py --cache-dir /tmp/xla-fresh --json "$OUT/bench_warm.json" 2>&1 \
  | grep -E "Start-up|summary|Total|Steps"
# The same warm run without async scheduling, to see what overlapping host and device work gains.
timeout 240 python3 examples/bench.py --cache-dir /tmp/xla-fresh --sync --json "$OUT/bench_sync.json" 2>&1 \
  | grep -E "Start-up|summary|Total|Steps"
