"""Pallas GPU kernels of nanovllm-jax, installed as `nanovllm_jax.kernels`.

The KV cache layout, one for the whole engine: per layer, two arrays `k_cache` and `v_cache` of shape
[S, K, P, H] (S pages, K kv heads, P = block size tokens per page, H head dim). A page of one head is
one contiguous P x H tile, so attention kernels read each page of each head as one dense block, and the
cache shards by kv head (axis 1) under tensor parallelism. A token's slot is page * P + offset.

Each kernel module holds the kernel, its `pallas_call` wrapper, one public jitted entry with input
checks, and a pure-jnp `*_reference` with the same signature (what CPU runs use).
"""

from .kv_store import store_kv, store_kv_reference
from .paged_attention import paged_decode_attention, paged_decode_attention_reference
from .prefill_attention import paged_prefill_attention, paged_prefill_attention_reference

__all__ = [
    "store_kv",
    "store_kv_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
]
