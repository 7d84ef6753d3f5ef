"""Process-wide settings the engine wants from XLA, NCCL and JAX, applied when an engine is constructed.

Environment variables only take effect if they are set before JAX starts its GPU backend; a user's own
setting always wins. If the backend has already started on a GPU without them, the engine warns.
"""

import os
import warnings

import jax

# JAX preallocates 75% of GPU memory by default; gpu_memory_utilization is a fraction of JAX's pool, so
# let the pool cover 95% of the device. NVLink multicast (NVLS) off for NCCL's all-reduces.
ENV_DEFAULTS = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "NCCL_NVLS_ENABLE": "0"}
# XLA command buffers (CUDA graphs) around all kernels, the Pallas custom calls included: a decode step
# launches ~500 small kernels, and launched one by one they leave the GPU idle at small batches.
XLA_DEFAULTS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
    "xla_gpu_graph_min_graph_size": "1",
}
# The persistent compilation cache, on by default (start-up compiles every bucket).
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_jax", "xla")


def _backend_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def apply_runtime_defaults():
    started = _backend_started()
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in XLA_DEFAULTS.items() if k not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    if started and added and jax.default_backend() == "gpu":
        warnings.warn(
            "JAX's GPU backend started before the engine was constructed, so its XLA flags "
            f"({' '.join(added)}) do not apply; construct the LLM before other JAX GPU work or set XLA_FLAGS "
            "yourself (decode steps are slower without command buffers)",
            stacklevel=3,
        )
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", DEFAULT_CACHE_DIR)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
