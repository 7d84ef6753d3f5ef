"""KV-cache store: write the K and V rows of the new tokens into the paged cache at `slot_mapping`.

Reference only so far; the Pallas kernel lands with the kernels issue.
"""

import functools

import jax
import jax.numpy as jnp

from ._checks import check_cache, check_int32


def _check(k_cache, v_cache, k, v, slot_mapping):
    check_cache(k_cache, v_cache)
    check_int32("slot_mapping", slot_mapping, 1)
    t = slot_mapping.shape[0]
    want = (t, k_cache.shape[1], k_cache.shape[3])
    if k.shape != want or v.shape != want:
        raise ValueError(f"k and v must be [tokens, kv_heads, head_dim] = {want}, got {k.shape} and {v.shape}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"k/v dtype ({k.dtype}, {v.dtype}) must match the cache dtype {k_cache.dtype}")


def store_kv_reference(k_cache, v_cache, k, v, slot_mapping):
    """Returns (k_cache, v_cache) with row t of k/v [T, K, H] written at slot slot_mapping[t] (-1: skip)."""
    num_pages, _, block_size, _ = k_cache.shape
    page = jnp.where(slot_mapping >= 0, slot_mapping // block_size, num_pages)  # out of range: dropped
    offset = slot_mapping % block_size
    k_cache = k_cache.at[page, :, offset].set(k, mode="drop")
    v_cache = v_cache.at[page, :, offset].set(v, mode="drop")
    return k_cache, v_cache


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _store_kv_jnp(k_cache, v_cache, k, v, slot_mapping):
    return store_kv_reference(k_cache, v_cache, k, v, slot_mapping)


def store_kv(k_cache, v_cache, k, v, slot_mapping):
    """Public entry (the caches are donated: rebind the result)."""
    _check(k_cache, v_cache, k, v, slot_mapping)
    return _store_kv_jnp(k_cache, v_cache, k, v, slot_mapping)
