"""Paged attention for the model: per-step metadata as an explicit pytree, and the store-then-attend step.

The new tokens' K/V are written into the paged cache first (`store_kv`), then attention reads every key,
prefix and new alike, from the cache. The KV cache flows functionally: each call returns the updated
caches, which the caller rebinds; the engine's jitted step donates them, so the store happens in place.
"""

from dataclasses import dataclass, field

import jax

from nanovllm_jax import kernels


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """What attention needs for one step. Arrays are data; `is_prefill` is static (one trace each).

    T tokens in the step (padded), B sequences (padded), W block-table width.
    """

    slot_mapping: jax.Array  # [T] int32, cache slot of each new token; -1 for padded tokens (no write)
    block_tables: jax.Array  # [B, W] int32 pages of each sequence; padding entries are never read
    context_lens: jax.Array  # [B] int32 tokens in the cache per sequence after this step's store; 0: padded
    cu_q_lens: jax.Array  # [B + 1] int32 cumulative new-token counts (prefill; unused in decode)
    is_prefill: bool = field(metadata=dict(static=True))


def paged_attention(q, k, v, kv_cache: tuple, md: AttentionMetadata, impl: str = "auto"):
    """q [T, N, H], k/v [T, K, H]; kv_cache: one layer's cache tuple (`kernels.kv_cache_shapes`).

    Returns (out [T, N, H], the updated cache tuple). The layout is read from the tuple: `(k_cache,
    v_cache)` [S, K, P, H] in the model dtype, or fp8's `(k_cache, v_cache, k_scale, v_scale)` (uint8
    pages, float32 scales [S, K, P]); the store quantizes and attention dequantizes in registers.
    impl "auto" uses the kernels' public entries (Pallas on GPU, their jnp references on CPU);
    "reference" forces the jnp references everywhere (for parity checks).
    """
    ref = impl == "reference"
    if kernels.is_fp8_cache(kv_cache):
        store = kernels.store_kv_fp8_reference if ref else kernels.store_kv_fp8
    else:
        store = kernels.store_kv_reference if ref else kernels.store_kv
    kv_cache = tuple(store(*kv_cache, k, v, md.slot_mapping))
    k_cache, v_cache, *scales = kv_cache
    scale_kw = dict(zip(("k_scale", "v_scale"), scales, strict=False))  # empty for the "auto" layout
    if md.is_prefill:
        if ref:
            out = kernels.paged_prefill_attention_reference(
                q, k_cache, v_cache, md.block_tables, md.cu_q_lens, md.context_lens, **scale_kw
            )
        else:
            # The Triton kernel, not the faster Mosaic GPU one: in the engine Mosaic left the bench's throughput
            # where it was (prefill attention is a small share of a prefill step) and lengthened the cold
            # start-up (BENCHMARKS.md). `kernels.paged_prefill_attention` alone defaults to Mosaic.
            out = kernels.paged_prefill_attention(
                q, k_cache, v_cache, md.block_tables, md.cu_q_lens, md.context_lens, backend="triton", **scale_kw
            )
    else:
        # Decode: one new token per sequence, so T == B.
        fn = kernels.paged_decode_attention_reference if ref else kernels.paged_decode_attention
        out = fn(q, k_cache, v_cache, md.block_tables, md.context_lens, **scale_kw)
    return out, kv_cache
