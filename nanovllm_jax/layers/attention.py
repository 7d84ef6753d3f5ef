"""Paged attention for the model: per-step metadata as an explicit pytree, and the store-then-attend step.

The new tokens' K/V are written into the paged cache first, then attention reads every key, prefix and
new alike, from the cache. Three ways to store: `paged_attention` takes q/k/v ready (after the model's q/k
norms and RoPE) and stores with `store_kv`; `qk_norm_rope_store` takes the qkv projection and does the
q/k norms, RoPE and the store in one kernel (either cache layout); `project_qk_norm_rope_store` takes the
projection's input and weight and runs the projection in that kernel too. After either, `attend` reads
the cache.
This module is where the backend is chosen: `impl` "auto" uses the kernels' public entries (Pallas on
GPU, their jnp references on CPU), "reference" the jnp references everywhere (parity checks). The KV
cache flows functionally: each call returns the updated caches, which the caller rebinds; the engine's
jitted step donates them, so the store happens in place.
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


def store_kv(k, v, kv_cache: tuple, md: AttentionMetadata, impl: str = "auto") -> tuple:
    """k/v [T, K, H] written at `md.slot_mapping` (-1: skipped) into one layer's cache tuple, returned.

    The layout is read from the tuple (`kernels.kv_cache_shapes`): `(k_cache, v_cache)` [S, K, P, H] in
    the model dtype, or fp8's `(k_cache, v_cache, k_scale, v_scale)` (uint8 pages, float32 scales
    [S, K, P]), which the store quantizes into.
    """
    ref = impl == "reference"
    if kernels.is_fp8_cache(kv_cache):
        store = kernels.store_kv_fp8_reference if ref else kernels.store_kv_fp8
    else:
        store = kernels.store_kv_reference if ref else kernels.store_kv
    return tuple(store(*kv_cache, k, v, md.slot_mapping))


def project_qk_norm_rope_store(
    x, w, positions, q_norm, k_norm, kv_cache: tuple, md: AttentionMetadata, *, theta, eps, impl: str = "auto"
):
    """`qk_norm_rope_store` of the qkv projection x @ w (x [T, D], w [D, (N+2K)H]), with the projection in
    the same kernel where it applies (`kernels.matmul_qk_norm_rope_store`). Returns (q [T, N, H], cache)."""
    fn = kernels.matmul_qk_norm_rope_store_reference if impl == "reference" else kernels.matmul_qk_norm_rope_store
    return fn(x, w, tuple(kv_cache), positions, md.slot_mapping, q_norm, k_norm, theta=theta, eps=eps)


def qk_norm_rope_store(
    qkv, positions, q_norm, k_norm, kv_cache: tuple, md: AttentionMetadata, *, theta, eps, impl: str = "auto"
):
    """One kernel from the qkv projection [T, (N+2K)H] to attention's inputs: returns (q [T, N, H], cache).

    q and k get their RMSNorm (weights q_norm, k_norm [H]) and RoPE at `positions`; k and v are stored
    at `md.slot_mapping`, quantized first when the cache tuple is fp8's.
    """
    ref = impl == "reference"
    if kernels.is_fp8_cache(kv_cache):
        fn = kernels.qk_norm_rope_store_fp8_reference if ref else kernels.qk_norm_rope_store_fp8
    else:
        fn = kernels.qk_norm_rope_store_reference if ref else kernels.qk_norm_rope_store
    q, *kv_cache = fn(*kv_cache, qkv, positions, md.slot_mapping, q_norm, k_norm, theta=theta, eps=eps)
    return q, tuple(kv_cache)


def attend(q, kv_cache: tuple, md: AttentionMetadata, impl: str = "auto"):
    """q [T, N, H] attending over the cache, which already holds this step's keys. Returns [T, N, H].

    fp8 pages are dequantized in registers (or by the references) with their scales.
    """
    ref = impl == "reference"
    k_cache, v_cache, *scales = kv_cache
    scale_kw = dict(zip(("k_scale", "v_scale"), scales, strict=False))  # empty for the "auto" layout
    if md.is_prefill:
        if ref:
            return kernels.paged_prefill_attention_reference(
                q, k_cache, v_cache, md.block_tables, md.cu_q_lens, md.context_lens, **scale_kw
            )
        # The Triton kernel, not the faster Mosaic GPU one: in the engine Mosaic left the bench's throughput
        # where it was (prefill attention is a small share of a prefill step) and lengthened the cold
        # start-up (BENCHMARKS.md). `kernels.paged_prefill_attention` alone defaults to Mosaic.
        return kernels.paged_prefill_attention(
            q, k_cache, v_cache, md.block_tables, md.cu_q_lens, md.context_lens, backend="triton", **scale_kw
        )
    # Decode: one new token per sequence, so T == B.
    fn = kernels.paged_decode_attention_reference if ref else kernels.paged_decode_attention
    return fn(q, k_cache, v_cache, md.block_tables, md.context_lens, **scale_kw)


def paged_attention(q, k, v, kv_cache: tuple, md: AttentionMetadata, impl: str = "auto"):
    """q [T, N, H], k/v [T, K, H]; kv_cache: one layer's cache tuple (`kernels.kv_cache_shapes`).

    Stores k/v (`store_kv`), then attends (`attend`). Returns (out [T, N, H], the updated cache tuple).
    """
    kv_cache = store_kv(k, v, kv_cache, md, impl)
    return attend(q, kv_cache, md, impl), kv_cache
