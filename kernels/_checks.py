"""Input checks shared by the kernels' public entries: clear ValueErrors instead of errors deep in JAX."""

import jax.numpy as jnp

MIN_ROWS = 16  # the smallest dot operand dimension of the Triton lowering


def check_cache(k_cache, v_cache):
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [pages, kv_heads, block_size, head_dim], got shape {k_cache.shape}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must match: {k_cache.shape} {k_cache.dtype} vs {v_cache.shape} {v_cache.dtype}"
        )
    if k_cache.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"the KV cache must be bfloat16 or float32, got {k_cache.dtype}")


def check_fp8_cache(k_cache, v_cache, k_scale, v_scale):
    """The fp8 layout of kv_layout.py: uint8 pages [S, K, P, H] and float32 scales [S, K, P]."""
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"fp8 k/v caches must be matching [S, K, P, H], got {k_cache.shape} and {v_cache.shape}")
    if k_cache.dtype != jnp.uint8 or v_cache.dtype != jnp.uint8:
        raise ValueError(f"fp8 caches hold uint8 bytes of float8_e4m3fn, got {k_cache.dtype} and {v_cache.dtype}")
    want = k_cache.shape[:3]
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.shape != want or s.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 {want}, got {s.dtype} {s.shape}")


def check_cache_and_scales(k_cache, v_cache, k_scale, v_scale):
    """Either a plain cache (no scales) or the fp8 layout (both scales)."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale (fp8 cache) or neither")
    if k_scale is None:
        check_cache(k_cache, v_cache)
    else:
        check_fp8_cache(k_cache, v_cache, k_scale, v_scale)


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
    if k_cache.dtype == jnp.uint8:  # fp8 pages: dequantized to q's dtype
        if q.dtype not in (jnp.bfloat16, jnp.float32):
            raise ValueError(f"q must be bfloat16 or float32 with an fp8 cache, got {q.dtype}")
    elif q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the cache dtype {k_cache.dtype}")


def check_prefill(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, k_scale=None, v_scale=None):
    """The inputs of a prefill attention call (both prefill kernels and the reference's entry)."""
    check_cache_and_scales(k_cache, v_cache, k_scale, v_scale)
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


def check_triton_shapes(head_dim: int, block_size: int, block_k: int):
    """What the Triton-lowered attention kernels need of the head dim and of their key blocks."""
    if block_k < MIN_ROWS:
        raise ValueError(f"the page size {block_size} must be a multiple of {MIN_ROWS} for the kernel")
    if head_dim & (head_dim - 1) or head_dim < MIN_ROWS:
        raise ValueError(f"the kernel needs a power-of-two head_dim >= {MIN_ROWS}, got {head_dim}")
