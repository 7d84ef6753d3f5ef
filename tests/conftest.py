"""Shared fixtures: tiny random Qwen3 checkpoints (made once per session) and the `gpu` marker's skip."""

import os
import sys

# `python -m pytest` puts the repo root on sys.path, where the top-level kernels/ folder (installed as
# nanovllm_jax.kernels) would shadow Hugging Face's `kernels` package, which transformers imports.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]

# Four fake CPU devices for the tensor-parallel tests (must be set before JAX starts its CPU backend).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import pytest  # noqa: E402

from nanovllm_jax.utils.checkpoint import make_checkpoint  # noqa: E402

# Tests reuse compiled programs across runs (CI and local) through JAX's persistent cache.
jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("NANOVLLM_JAX_CACHE", os.path.expanduser("~/.cache/nanovllm_jax/xla"))
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(size, dtype='float32', **kw) -> path of a random HF-format checkpoint, cached per args."""
    made = {}

    def make(size="tiny", dtype="float32", **kw):
        key = (size, dtype, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{size}-{dtype}")
            made[key] = make_checkpoint(str(path), size, dtype, **kw)
        return made[key]

    return make
