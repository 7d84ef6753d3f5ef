"""nanovllm-jax: nano-vllm's engine and API in JAX, with Pallas GPU kernels."""

import importlib.util
import os
import sys

from nanovllm_jax.sampling_params import SamplingParams


def _load_source_checkout_kernels():
    """The top-level kernels/ folder installs as `nanovllm_jax.kernels` (pyproject's package-dir). Run from
    a source checkout (its root first on sys.path, or an editable install without setuptools' finder),
    Python finds this package but not that mapping: then load kernels/ under its installed name."""
    if importlib.util.find_spec(f"{__name__}.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.kernels", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_load_source_checkout_kernels()

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in the engine (and JAX); import it lazily so `SamplingParams` stays cheap.
    if name == "LLM":
        from nanovllm_jax.llm import LLM

        return LLM
    raise AttributeError(name)
