"""layers of nanovllm-jax."""
