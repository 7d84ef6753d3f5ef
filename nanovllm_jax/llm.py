"""The public `LLM` class (nano-vllm's API): the engine itself."""

from nanovllm_jax.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    pass
