"""engine of nanovllm-jax."""
