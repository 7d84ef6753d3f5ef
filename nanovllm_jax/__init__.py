"""nanovllm-jax: nano-vllm's engine and API in JAX, with Pallas GPU kernels."""

from nanovllm_jax.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in the engine (and JAX); import it lazily so `SamplingParams` stays cheap.
    if name == "LLM":
        from nanovllm_jax.llm import LLM

        return LLM
    raise AttributeError(name)
