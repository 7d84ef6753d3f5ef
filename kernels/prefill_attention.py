"""Prefill attention over packed variable-length prompts, each with an optional cached prefix.

Reference only so far; the Pallas kernel lands with the kernels issue.
"""

import functools

import jax
import jax.numpy as jnp

from ._checks import check_cache, check_int32, check_query


def paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, *, scale=None):
    """Causal prefill attention in plain jnp, reading all keys/values from the paged cache.

    The new tokens' K/V must already be stored in the cache (the engine stores, then attends).

    Args:
      q: [T, N, H] the new tokens of all sequences, packed; rows past cu_q_lens[-1] are padding (output 0).
      k_cache, v_cache: [S, K, P, H] paged cache.
      block_tables: [B, W] int32 page ids per sequence.
      cu_q_lens: [B + 1] int32 cumulative new-token counts (cu_q_lens[0] == 0; padded sequences add 0).
      context_lens: [B] int32 total tokens per sequence (cached prefix + new tokens). The i-th new token
        of sequence b sits at position context_lens[b] - q_len[b] + i and attends to positions <= it.
      scale: softmax scale, default H ** -0.5.
    Returns:
      [T, N, H] in q's dtype.
    """
    T, N, H = q.shape
    _, K, P, _ = k_cache.shape
    B, W = block_tables.shape
    scale = H**-0.5 if scale is None else scale
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right").astype(jnp.int32) - 1, 0, B - 1)
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = context_lens[seq] - q_len[seq] + (t - cu_q_lens[seq])  # [T]
    live = t < cu_q_lens[-1]
    pos = jnp.where(live, pos, -1)  # a padded row attends to nothing

    def one_token(args):
        q_t, table, p = args  # [N, H], [W], []
        k = k_cache[table].transpose(1, 0, 2, 3).reshape(K, W * P, H).astype(jnp.float32)
        v = v_cache[table].transpose(1, 0, 2, 3).reshape(K, W * P, H).astype(jnp.float32)
        valid = jnp.arange(W * P) <= p
        s = jnp.einsum("kgh,klh->kgl", q_t.reshape(K, N // K, H).astype(jnp.float32), k) * scale
        s = jnp.where(valid, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("kgl,klh->kgh", e, jnp.where(valid[None, :, None], v, 0.0))
        return (o / jnp.where(denom > 0, denom, 1.0)).reshape(N, H)

    # Tokens in chunks keep the gathered keys ([chunk, K, L, H]) small on the CPU.
    o = jax.lax.map(one_token, (q, block_tables[seq], pos), batch_size=min(T, 32))
    return o.astype(q.dtype)


def _check(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens):
    check_cache(k_cache, v_cache)
    check_query(q, k_cache, "[tokens, q_heads, head_dim]")
    check_int32("block_tables", block_tables, 2)
    check_int32("cu_q_lens", cu_q_lens, 1)
    check_int32("context_lens", context_lens, 1)
    b = block_tables.shape[0]
    if cu_q_lens.shape[0] != b + 1 or context_lens.shape[0] != b:
        raise ValueError(
            f"need cu_q_lens [B+1] and context_lens [B] for B={b} sequences, got {cu_q_lens.shape} and {context_lens.shape}"
        )


@functools.partial(jax.jit, static_argnames=("scale",))
def _prefill_jnp(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, *, scale=None):
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, scale=scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, *, scale=None):
    """Public entry; same contract as `paged_prefill_attention_reference`."""
    _check(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens)
    return _prefill_jnp(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, scale=scale)
