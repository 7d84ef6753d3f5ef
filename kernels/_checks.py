"""Input checks shared by the kernels' public entries: clear ValueErrors instead of errors deep in JAX."""

import jax.numpy as jnp


def check_cache(k_cache, v_cache):
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [pages, kv_heads, block_size, head_dim], got shape {k_cache.shape}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must match: {k_cache.shape} {k_cache.dtype} vs {v_cache.shape} {v_cache.dtype}"
        )
    if k_cache.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"the KV cache must be bfloat16 or float32, got {k_cache.dtype}")


def check_int32(name, x, ndim):
    if x.ndim != ndim or x.dtype != jnp.int32:
        raise ValueError(f"{name} must be a rank-{ndim} int32 array, got shape {x.shape} dtype {x.dtype}")


def check_query(q, k_cache, q_ndim_name):
    _, num_kv_heads, _, head_dim = k_cache.shape
    if q.ndim != 3:
        raise ValueError(f"q must be {q_ndim_name}, got shape {q.shape}")
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({num_kv_heads})")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the cache dtype {k_cache.dtype}")


def check_prefill(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens):
    """The inputs of a prefill attention call (both prefill kernels and the reference's entry)."""
    check_cache(k_cache, v_cache)
    check_query(q, k_cache, "[tokens, q_heads, head_dim]")
    check_int32("block_tables", block_tables, 2)
    check_int32("cu_q_lens", cu_q_lens, 1)
    check_int32("context_lens", context_lens, 1)
    b = block_tables.shape[0]
    if cu_q_lens.shape[0] != b + 1 or context_lens.shape[0] != b:
        raise ValueError(
            f"need cu_q_lens [B+1] and context_lens [B] for B={b} sequences,"
            f" got {cu_q_lens.shape} and {context_lens.shape}"
        )
