"""Pallas GPU kernels of nanovllm-jax, installed as `nanovllm_jax.kernels`.

The KV cache layout, one for the whole engine, is defined in kv_layout.py (`kv_cache_shapes`): per layer
a tuple of arrays with the kv-head axis at position 1 (the cache shards by kv head under tensor
parallelism). "auto": `k_cache` and `v_cache` [S, K, P, H] (S pages, K kv heads, P = block size tokens
per page, H head dim) in the model dtype; "fp8": uint8 pages of e4m3 bytes plus float32 scales
[S, K, P]. A page of one head is one contiguous P x H tile, so attention kernels read each page of each
head as one dense block. A token's slot is page * P + offset.

Each kernel module holds the kernel, its `pallas_call` wrapper, one public jitted entry with input
checks, and a pure-jnp `*_reference` with the same signature (what CPU runs use).
"""

from .gemm import (
    ROW_MULTIPLE,
    matmul,
    matmul_partials,
    matmul_reference,
    matmul_silu_mul,
    matmul_silu_mul_reference,
    sum_partials,
)
from .kv_layout import KV_CACHE_DTYPES, is_fp8_cache, kv_cache_bytes, kv_cache_shapes
from .kv_store import store_kv, store_kv_fp8, store_kv_fp8_reference, store_kv_reference
from .matmul_qk_norm_rope_store import matmul_qk_norm_rope_store, matmul_qk_norm_rope_store_reference
from .norms import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .paged_attention import paged_decode_attention, paged_decode_attention_reference
from .prefill_attention import paged_prefill_attention, paged_prefill_attention_reference
from .qk_norm_rope_store import (
    qk_norm_rope_store,
    qk_norm_rope_store_fp8,
    qk_norm_rope_store_fp8_reference,
    qk_norm_rope_store_reference,
)
from .sampling import gumbel_argmax, gumbel_argmax_reference

__all__ = [
    "KV_CACHE_DTYPES",
    "is_fp8_cache",
    "kv_cache_bytes",
    "kv_cache_shapes",
    "store_kv_fp8",
    "store_kv_fp8_reference",
    "store_kv",
    "store_kv_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "qk_norm_rope_store",
    "qk_norm_rope_store_reference",
    "qk_norm_rope_store_fp8",
    "qk_norm_rope_store_fp8_reference",
    "matmul_qk_norm_rope_store",
    "matmul_qk_norm_rope_store_reference",
    "add_rms_norm",
    "add_rms_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "ROW_MULTIPLE",
    "matmul",
    "matmul_partials",
    "matmul_reference",
    "matmul_silu_mul",
    "matmul_silu_mul_reference",
    "sum_partials",
    "gumbel_argmax",
    "gumbel_argmax_reference",
]
