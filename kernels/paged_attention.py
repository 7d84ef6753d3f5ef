"""Paged decode attention: one query token per sequence against its pages in the paged KV cache.

Reference only so far; the Pallas kernel lands with the kernels issue.
"""

import functools

import jax
import jax.numpy as jnp

from ._checks import check_cache, check_int32, check_query


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, *, scale=None):
    """Decode attention in plain jnp.

    Args:
      q: [B, N, H] one query per sequence.
      k_cache, v_cache: [S, K, P, H] paged cache (see `nanovllm_jax.kernels`).
      block_tables: [B, W] int32 page ids per sequence; entries past the context are never read
        for their values (they may point at any page, even one holding NaN).
      context_lens: [B] int32 tokens in the cache per sequence (0 for a padded row: output 0).
      scale: softmax scale, default H ** -0.5.
    Returns:
      [B, N, H] in q's dtype.
    """
    B, N, H = q.shape
    _, K, P, _ = k_cache.shape
    W = block_tables.shape[1]
    scale = H**-0.5 if scale is None else scale
    k = k_cache[block_tables].transpose(0, 2, 1, 3, 4).reshape(B, K, W * P, H)  # [B, K, L, H]
    v = v_cache[block_tables].transpose(0, 2, 1, 3, 4).reshape(B, K, W * P, H)
    valid = jnp.arange(W * P)[None, :] < context_lens[:, None]  # [B, L]
    qg = q.reshape(B, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("bkgh,bklh->bkgl", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(valid[:, None, :, None], v.astype(jnp.float32), 0.0)  # NaN pages must not leak
    o = jnp.einsum("bkgl,bklh->bkgh", p, v) / jnp.where(denom > 0, denom, 1.0)
    return o.reshape(B, N, H).astype(q.dtype)


def _check(q, k_cache, v_cache, block_tables, context_lens):
    check_cache(k_cache, v_cache)
    check_query(q, k_cache, "[batch, q_heads, head_dim]")
    check_int32("block_tables", block_tables, 2)
    check_int32("context_lens", context_lens, 1)
    if block_tables.shape[0] != q.shape[0] or context_lens.shape[0] != q.shape[0]:
        raise ValueError(
            f"batch mismatch: q {q.shape[0]}, block_tables {block_tables.shape[0]}, context_lens {context_lens.shape[0]}"
        )


@functools.partial(jax.jit, static_argnames=("scale",))
def _decode_jnp(q, k_cache, v_cache, block_tables, context_lens, *, scale=None):
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale=scale)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale=None):
    """Public entry; same contract as `paged_decode_attention_reference`."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    return _decode_jnp(q, k_cache, v_cache, block_tables, context_lens, scale=scale)
