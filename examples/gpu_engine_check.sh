#!/usr/bin/env bash
# The engine on the GPU (device tool): install, the engine tests with the Pallas kernels (fp32 tiny
# checkpoints at full matmul precision, so greedy tokens must equal HF's), then nano-vllm's bench.
# Logs go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q -x tests/test_engine.py tests/test_model_parity.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/engine_tests.log" | tail -5
timeout 420 python3 examples/bench.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v "it/s"
