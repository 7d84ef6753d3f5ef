"""models of nanovllm-jax."""
