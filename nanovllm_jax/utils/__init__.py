"""utils of nanovllm-jax."""
