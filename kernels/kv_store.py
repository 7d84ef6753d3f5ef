"""KV-cache store: write the K and V rows of the new tokens into the paged cache at `slot_mapping`.

Backend: the Triton lowering of Pallas. The store is a scatter of [K, H] rows to data-dependent pages,
and the Triton lowering has `input_output_aliases` (Mosaic GPU's `plgpu.kernel` has none) and runs in
interpret mode on the CPU, so the same kernel is tested here and on the GPU. One program per (token,
kv head) writes one K row and one V row; a slot of -1 (a padding token) skips the write under
`pl.when`, so -1 never becomes an address (its time: BENCHMARKS.md, "## Kernels").

In place: the caches are aliased to the outputs, and the jitted entry donates them; under the engine's
own jit the donation is the engine's (a nested jit's donation is ignored). Rebind the result.

fp8 caches (`store_kv_fp8`, layout in kv_layout.py): the rows are quantized first by one small XLA
fusion (`kv_layout.quantize_fp8`, per (token, kv head) row: amax, scale, e4m3 bytes), the same jnp code
the reference runs, so kernel and reference write identical bytes and scales; the kernel then scatters
the uint8 rows and their float32 scales like the bf16 rows.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._checks import check_cache, check_fp8_cache, check_int32
from .kv_layout import quantize_fp8


def _store_kv_kernel(
    slot_ref,  # [T] int32, whole
    k_ref,  # [H] this token's row of this kv head
    v_ref,  # [H]
    k_cache_in_ref,  # [S, K, P, H] aliased with k_cache_ref: never read
    v_cache_in_ref,  # [S, K, P, H] aliased with v_cache_ref: never read
    k_cache_ref,  # [S, K, P, H] whole
    v_cache_ref,  # [S, K, P, H] whole
):
    del k_cache_in_ref, v_cache_in_ref
    block_size = k_cache_ref.shape[2]
    slot = slot_ref[pl.program_id(0)]
    head = pl.program_id(1)

    @pl.when(slot >= 0)  # -1: a padding token, nothing to write (and -1 must never be an address)
    def _():
        page, offset = slot // block_size, slot % block_size
        k_cache_ref[page, head, offset, :] = k_ref[...]
        v_cache_ref[page, head, offset, :] = v_ref[...]


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1))
def _store_kv_pallas(k_cache, v_cache, k, v, slot_mapping, *, interpret=False):
    t, num_kv_heads, head_dim = k.shape
    return pl.pallas_call(
        _store_kv_kernel,
        grid=(t, num_kv_heads),
        in_specs=[
            pl.no_block_spec,  # slot_mapping [T]: whole, one scalar read per program
            pl.BlockSpec((None, None, head_dim), lambda i, h: (i, h, 0)),  # k [T, K, H] -> row [H]
            pl.BlockSpec((None, None, head_dim), lambda i, h: (i, h, 0)),  # v [T, K, H] -> row [H]
            pl.no_block_spec,  # k_cache [S, K, P, H]: whole, aliased to output 0
            pl.no_block_spec,  # v_cache [S, K, P, H]: whole, aliased to output 1
        ],
        out_specs=[pl.no_block_spec, pl.no_block_spec],  # the caches, written at the slots only
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="store_kv",
    )(slot_mapping, k, v, k_cache, v_cache)


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


def store_kv(k_cache, v_cache, k, v, slot_mapping, *, interpret=False):
    """Public entry: writes k/v [T, K, H] into the caches at slot_mapping [T] (-1: skip), in place.

    Args:
      k_cache, v_cache: [S, K, P, H] paged cache; donated when called directly (rebind the result).
      k, v: [T, K, H] the new tokens' rows, in the cache dtype.
      slot_mapping: [T] int32 slot = page * P + offset, or -1 for a padding token.
      interpret: run the Pallas kernel in interpret mode (tests on the CPU). Otherwise the CPU runs the
        jnp reference and a GPU the kernel.
    Returns:
      (k_cache, v_cache) updated.
    """
    _check(k_cache, v_cache, k, v, slot_mapping)
    if jax.default_backend() == "cpu" and not interpret:
        return _store_kv_jnp(k_cache, v_cache, k, v, slot_mapping)
    return _store_kv_pallas(k_cache, v_cache, k, v, slot_mapping, interpret=interpret)


# ------------------------------------------------------------------------------------------------ fp8


def _store_kv_fp8_kernel(
    slot_ref,  # [T] int32, whole
    k_ref,  # [H] uint8 this token's quantized row of this kv head
    v_ref,  # [H] uint8
    ks_ref,  # [1] float32 its scale
    vs_ref,  # [1] float32
    k_cache_in_ref,  # [S, K, P, H] uint8, aliased with k_cache_ref: never read
    v_cache_in_ref,  # [S, K, P, H] uint8
    k_scale_in_ref,  # [S, K, P] float32, aliased with k_scale_ref: never read
    v_scale_in_ref,  # [S, K, P] float32
    k_cache_ref,  # [S, K, P, H] whole
    v_cache_ref,  # [S, K, P, H] whole
    k_scale_ref,  # [S, K, P] whole
    v_scale_ref,  # [S, K, P] whole
):
    del k_cache_in_ref, v_cache_in_ref, k_scale_in_ref, v_scale_in_ref
    block_size = k_cache_ref.shape[2]
    slot = slot_ref[pl.program_id(0)]
    head = pl.program_id(1)

    @pl.when(slot >= 0)  # -1: a padding token, nothing to write (and -1 must never be an address)
    def _():
        page, offset = slot // block_size, slot % block_size
        k_cache_ref[page, head, offset, :] = k_ref[...]
        v_cache_ref[page, head, offset, :] = v_ref[...]
        k_scale_ref[page, head, pl.ds(offset, 1)] = ks_ref[...]
        v_scale_ref[page, head, pl.ds(offset, 1)] = vs_ref[...]


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1, 2, 3))
def _store_kv_fp8_pallas(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping, *, interpret=False):
    t, num_kv_heads, head_dim = k.shape
    k8, ks = quantize_fp8(k)  # [T, K, H] uint8, [T, K] float32
    v8, vs = quantize_fp8(v)
    row = pl.BlockSpec((None, None, head_dim), lambda i, h: (i, h, 0))  # [T, K, H] -> row [H]
    one = pl.BlockSpec((None, None, 1), lambda i, h: (i, h, 0))  # [T, K, 1] -> [1]
    return pl.pallas_call(
        _store_kv_fp8_kernel,
        grid=(t, num_kv_heads),
        in_specs=[pl.no_block_spec, row, row, one, one] + [pl.no_block_spec] * 4,  # slots; rows; scales; caches
        out_specs=[pl.no_block_spec] * 4,  # the caches and scales, written at the slots only
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_cache, v_cache, k_scale, v_scale)],
        input_output_aliases={5: 0, 6: 1, 7: 2, 8: 3},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="store_kv_fp8",
    )(slot_mapping, k8, v8, ks[..., None], vs[..., None], k_cache, v_cache, k_scale, v_scale)


def store_kv_fp8_reference(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping):
    """fp8 layout: quantizes k/v [T, K, H] per row and writes bytes and scales at the slots (-1: skip)."""
    num_pages, _, block_size, _ = k_cache.shape
    page = jnp.where(slot_mapping >= 0, slot_mapping // block_size, num_pages)  # out of range: dropped
    offset = slot_mapping % block_size
    k8, ks = quantize_fp8(k)
    v8, vs = quantize_fp8(v)
    k_cache = k_cache.at[page, :, offset].set(k8, mode="drop")
    v_cache = v_cache.at[page, :, offset].set(v8, mode="drop")
    k_scale = k_scale.at[page, :, offset].set(ks, mode="drop")
    v_scale = v_scale.at[page, :, offset].set(vs, mode="drop")
    return k_cache, v_cache, k_scale, v_scale


@functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
def _store_kv_fp8_jnp(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping):
    return store_kv_fp8_reference(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping)


def store_kv_fp8(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping, *, interpret=False):
    """Public entry for the fp8 layout: quantizes k/v [T, K, H] and writes them at slot_mapping, in place.

    Args:
      k_cache, v_cache: [S, K, P, H] uint8 pages; k_scale, v_scale: [S, K, P] float32 (kv_layout.py).
        All four are donated when called directly (rebind the result).
      k, v: [T, K, H] the new tokens' rows (bfloat16 or float32).
      slot_mapping: [T] int32 slot = page * P + offset, or -1 for a padding token.
      interpret: as in `store_kv`.
    Returns:
      (k_cache, v_cache, k_scale, v_scale) updated.
    """
    check_fp8_cache(k_cache, v_cache, k_scale, v_scale)
    check_int32("slot_mapping", slot_mapping, 1)
    want = (slot_mapping.shape[0], k_cache.shape[1], k_cache.shape[3])
    if k.shape != want or v.shape != want:
        raise ValueError(f"k and v must be [tokens, kv_heads, head_dim] = {want}, got {k.shape} and {v.shape}")
    if jax.default_backend() == "cpu" and not interpret:
        return _store_kv_fp8_jnp(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping)
    return _store_kv_fp8_pallas(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping, interpret=interpret)
