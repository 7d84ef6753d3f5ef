"""The KV cache layout contract: which arrays one layer's cache holds, per `kv_cache_dtype`.

One layer's cache is a tuple of arrays, every one with the kv-head axis at position 1, so the engine
shards all of them with `P(None, tp_axis)` and sizes the cache from their bytes:

- "auto": `(k_cache, v_cache)`, each [S, K, P, H] in the model dtype (S pages, K kv heads, P tokens per
  page, H head dim). A page of one head is one contiguous P x H tile.
- "fp8": `(k_cache, v_cache, k_scale, v_scale)`: the pages [S, K, P, H] as uint8 (the raw bytes of
  float8_e4m3fn values) and their scales [S, K, P] float32, one per (token, kv head) row:
  row ~= e4m3(bytes) * scale with scale = amax(|row|) / 448 (no calibration; a zero row has scale 0).
  The bytes are stored as uint8 rather than as float8_e4m3fn so that no kernel depends on how a backend
  lowers float8 loads (the Triton lowering of Pallas gave NaN on a naive float8 load-and-sum); each
  kernel decodes the bytes in registers (see `paged_attention.py`).

A token's slot is page * P + offset. Kernels read the cache dtype from the arrays: a 4-array tuple is fp8.
"""

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("auto", "fp8")
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_STORAGE_DTYPE = jnp.uint8
FP8_SCALE_DTYPE = jnp.float32


def kv_cache_shapes(
    num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, dtype, kv_cache_dtype: str = "auto"
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The arrays of ONE layer's KV cache (see the module docstring), kv-head axis at position 1."""
    pages = (num_blocks, num_kv_heads, block_size, head_dim)
    if kv_cache_dtype == "auto":
        return (jax.ShapeDtypeStruct(pages, jnp.dtype(dtype)),) * 2
    if kv_cache_dtype == "fp8":
        scales = (num_blocks, num_kv_heads, block_size)
        return (
            jax.ShapeDtypeStruct(pages, FP8_STORAGE_DTYPE),
            jax.ShapeDtypeStruct(pages, FP8_STORAGE_DTYPE),
            jax.ShapeDtypeStruct(scales, FP8_SCALE_DTYPE),
            jax.ShapeDtypeStruct(scales, FP8_SCALE_DTYPE),
        )
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def kv_cache_bytes(shapes) -> int:
    """Bytes of the arrays returned by `kv_cache_shapes` (one layer)."""
    return sum(s.size * jnp.dtype(s.dtype).itemsize for s in shapes)


def is_fp8_cache(kv_cache) -> bool:
    """Whether a layer's cache tuple is the fp8 layout (else the "auto" pair)."""
    if len(kv_cache) == 4:
        return True
    if len(kv_cache) == 2:
        return False
    raise ValueError(f"a layer's KV cache is (k, v) or (k, v, k_scale, v_scale), got {len(kv_cache)} arrays")


def fp8_scale(amax):
    """A row's amax(|row|) -> (its scale amax / 448, and the factor 448 / amax that quantizes it; 0 for 0).

    Shared by `quantize_fp8` and the kernels that quantize in registers (qk_norm_rope_store.py), so
    their bytes and scales agree exactly.
    """
    scale = amax / FP8_MAX
    inv = jnp.where(amax > 0, FP8_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    return scale.astype(FP8_SCALE_DTYPE), inv


def fp8_bytes(x, inv):
    """float32 values times their factor from `fp8_scale` -> the uint8 bytes of their float8_e4m3fn values."""
    return jax.lax.bitcast_convert_type((x * inv).astype(FP8_DTYPE), FP8_STORAGE_DTYPE)


def quantize_fp8(x):
    """x [..., H] -> (bytes [..., H] uint8 of float8_e4m3fn, scale [...] float32), one scale per row.

    The store and its reference share this jnp function, so their bytes agree exactly; XLA's float32 to
    e4m3 conversion rounds to nearest even, and |x / scale| <= 448 never overflows to NaN.
    """
    x = x.astype(jnp.float32)
    scale, inv = fp8_scale(jnp.max(jnp.abs(x), axis=-1))
    return fp8_bytes(x, inv[..., None]), scale


def dequantize_fp8(data, scale, dtype=jnp.float32):
    """bytes [..., H] uint8 and scale [...] -> values [..., H] in `dtype` (the references' dequantization)."""
    x = jax.lax.bitcast_convert_type(data, FP8_DTYPE).astype(jnp.float32)
    return (x * scale.astype(jnp.float32)[..., None]).astype(dtype)
