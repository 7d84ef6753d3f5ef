"""Attention inputs in one kernel: q/k RMSNorm, RoPE on q and k, and the K/V store into the paged cache.

Between the qkv projection and attention, a decode step of Qwen3 otherwise runs per layer a slice copy,
small XLA fusions for the q/k norms and RoPE, and the `store_kv` kernel; at small batches each is a
launch of a few microseconds. This kernel reads the projection output [T, (N+2K)*H] (the fused column
layout [q | k | v]) once and does all of it: program (t, j) of the grid (T, N + K) takes q head j of
token t (j < N: normalize, rotate, write q) or kv head j - N (normalize and rotate the k row, then write
the k and v rows at the token's slot; a slot of -1, a padding token, writes nothing under `pl.when`, so
-1 never becomes an address). A per-head grid handles head counts that are not powers of two (Qwen3-14B
has 40 q heads); each program loads the two halves of its row as separate blocks (rotate-half RoPE),
so the head dim must be a power of two (64 or 128 in Qwen3).

The math is the unfused path's, in its order: RMSNorm in float32 (x * rsqrt(mean(x^2) + eps)), cast to
the model dtype, times the weight; then RoPE with cos/sin of positions * inv_freq in float32, cast to the
model dtype, and the rotation in the model dtype (layers/rotary.py). The frequencies inv_freq [H/2] come
in as an operand computed by XLA with the function `apply_rope` uses (`rope_inv_freq`), so kernel and
reference rotate by the same float32 angles (an ulp off in a frequency moves the angle at position 4000 by
~1e-4 rad); XLA can merge the layers' identical copies of that small fusion into one.
`qk_norm_rope_store_reference` is the unfused path itself (`rms_norm_reference`, the model's norm;
`apply_rope`; `store_kv_reference`), and the CPU runs it.

Backend: the Triton lowering of Pallas, as for `store_kv` (kv_store.py): the cache update needs
`input_output_aliases`, which Mosaic GPU's `plgpu.kernel` lacks; the same kernel runs in interpret mode
on the CPU. In place: the caches are aliased to the outputs and the jitted entry donates them (under the
engine's jit the donation is the engine's). Rebind the result. fp8 caches are not handled here: the model
keeps the unfused path (norms, RoPE, `store_kv_fp8`) for them and for checkpoints without q/k norm.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nanovllm_jax.layers.rotary import apply_rope, rope_inv_freq

from ._checks import check_cache, check_int32
from .kv_store import store_kv_reference
from .norms import rms_norm_reference


def _qk_norm_rope_store_kernel(
    pos_ref,  # [T] int32, whole
    slot_ref,  # [T] int32, whole
    inv_freq_ref,  # [H/2] float32, whole
    q_norm_ref,  # [H] q_norm weight, whole
    k_norm_ref,  # [H] k_norm weight, whole
    row_ref,  # [H] token t's qkv row j: q head j (j < N) or k head j - N
    v_ref,  # [H] token t's qkv row j + K: the v row of kv head j - N (read only when j >= N)
    k_cache_in_ref,  # [S, K, P, H] aliased with k_cache_ref: never read
    v_cache_in_ref,  # [S, K, P, H] aliased with v_cache_ref: never read
    q_ref,  # [T, N, H] whole, row (t, j) written by program (t, j < N)
    k_cache_ref,  # [S, K, P, H] whole
    v_cache_ref,  # [S, K, P, H] whole
    *,
    eps: float,
):
    del k_cache_in_ref, v_cache_in_ref
    num_heads, block_size = q_ref.shape[1], k_cache_ref.shape[2]
    half = row_ref.shape[0] // 2
    dtype = row_ref.dtype
    t, j = pl.program_id(0), pl.program_id(1)
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    def norm_rope(weight_ref):
        """RMSNorm then RoPE of this program's row, as (first half, second half) in the model dtype."""
        x1, x2 = row_ref[lo].astype(jnp.float32), row_ref[hi].astype(jnp.float32)
        inv_rms = jax.lax.rsqrt((jnp.sum(x1 * x1) + jnp.sum(x2 * x2)) / (2 * half) + eps)
        x1 = weight_ref[lo] * (x1 * inv_rms).astype(dtype)
        x2 = weight_ref[hi] * (x2 * inv_rms).astype(dtype)
        angles = pos_ref[t].astype(jnp.float32) * inv_freq_ref[...]  # [H/2] float32
        cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @pl.when(j < num_heads)
    def _():
        q1, q2 = norm_rope(q_norm_ref)
        q_ref[t, j, lo] = q1
        q_ref[t, j, hi] = q2

    slot = slot_ref[t]

    @pl.when((j >= num_heads) & (slot >= 0))  # slot -1: a padding token, nothing to write
    def _():
        k1, k2 = norm_rope(k_norm_ref)
        page, offset, head = slot // block_size, slot % block_size, j - num_heads
        k_cache_ref[page, head, offset, lo] = k1
        k_cache_ref[page, head, offset, hi] = k2
        v_cache_ref[page, head, offset, :] = v_ref[...]


@functools.partial(jax.jit, static_argnames=("theta", "eps", "interpret"), donate_argnums=(0, 1))
def _qk_norm_rope_store_pallas(
    k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, *, theta, eps, interpret=False
):
    t = qkv.shape[0]
    _, num_kv_heads, _, head_dim = k_cache.shape
    num_rows = qkv.shape[1] // head_dim  # N + 2K
    num_heads = num_rows - 2 * num_kv_heads
    qkv = qkv.reshape(t, num_rows, head_dim)  # a bitcast: rows [q heads | k heads | v heads]
    cache = jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)

    def row(shift):  # qkv [T, N+2K, H] -> the row [H] of token i, head j + shift
        return pl.BlockSpec((None, None, head_dim), lambda i, j: (i, j + shift, 0))

    return pl.pallas_call(
        functools.partial(_qk_norm_rope_store_kernel, eps=eps),
        grid=(t, num_heads + num_kv_heads),
        in_specs=[
            pl.no_block_spec,  # positions [T]: whole, one scalar read per program
            pl.no_block_spec,  # slot_mapping [T]: whole, one scalar read per program
            pl.no_block_spec,  # inv_freq [H/2]: whole
            pl.no_block_spec,  # q_norm weight [H]: whole
            pl.no_block_spec,  # k_norm weight [H]: whole
            row(0),  # qkv -> row j: q head j, or k head j - N
            row(num_kv_heads),  # qkv -> row j + K: v head j - N (a q/k row for q programs, never read)
            pl.no_block_spec,  # k_cache [S, K, P, H]: whole, aliased to output 1
            pl.no_block_spec,  # v_cache [S, K, P, H]: whole, aliased to output 2
        ],
        out_specs=[pl.no_block_spec] * 3,  # q [T, N, H] row by row; the caches at the slots only
        out_shape=[jax.ShapeDtypeStruct((t, num_heads, head_dim), qkv.dtype), cache, cache],
        input_output_aliases={7: 1, 8: 2},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="qk_norm_rope_store",
    )(positions, slot_mapping, rope_inv_freq(head_dim, theta), q_norm, k_norm, qkv, qkv, k_cache, v_cache)


def _check(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm):
    if k_cache.dtype == jnp.uint8:
        raise ValueError("fp8 caches are not supported by the fused kernel: use the norms, RoPE and store_kv_fp8")
    check_cache(k_cache, v_cache)
    check_int32("positions", positions, 1)
    check_int32("slot_mapping", slot_mapping, 1)
    _, num_kv_heads, _, head_dim = k_cache.shape
    t = positions.shape[0]
    num_heads = qkv.shape[-1] // head_dim - 2 * num_kv_heads
    if qkv.shape != (t, (num_heads + 2 * num_kv_heads) * head_dim) or num_heads <= 0:
        raise ValueError(
            f"qkv must be [{t} tokens, (q_heads + 2 * {num_kv_heads} kv_heads) * {head_dim}], got {qkv.shape}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"qkv must be [tokens, (q_heads + 2 * {num_kv_heads} kv_heads) * {head_dim}] with q_heads"
            f" a multiple of kv_heads, got {num_heads} q heads"
        )
    if slot_mapping.shape[0] != t:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} tokens, positions {t}")
    if qkv.dtype != k_cache.dtype:
        raise ValueError(f"qkv dtype {qkv.dtype} must match the cache dtype {k_cache.dtype}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w.shape != (head_dim,) or w.dtype != qkv.dtype:
            raise ValueError(f"{name} weight must be [{head_dim}] {qkv.dtype}, got {w.shape} {w.dtype}")


def qk_norm_rope_store_reference(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, *, theta, eps):
    """The unfused path: split qkv, RMSNorm q and k, RoPE, store k/v. Returns (q, k_cache, v_cache)."""
    t = qkv.shape[0]
    _, num_kv_heads, _, head_dim = k_cache.shape
    num_heads = qkv.shape[1] // head_dim - 2 * num_kv_heads
    q, k, v = jnp.split(qkv, [num_heads * head_dim, (num_heads + num_kv_heads) * head_dim], axis=-1)
    q = q.reshape(t, num_heads, head_dim)
    k, v = k.reshape(t, num_kv_heads, head_dim), v.reshape(t, num_kv_heads, head_dim)
    q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    q, k = apply_rope(q, positions, theta), apply_rope(k, positions, theta)
    k_cache, v_cache = store_kv_reference(k_cache, v_cache, k, v, slot_mapping)
    return q, k_cache, v_cache


@functools.partial(jax.jit, static_argnames=("theta", "eps"), donate_argnums=(0, 1))
def _qk_norm_rope_store_jnp(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, *, theta, eps):
    return qk_norm_rope_store_reference(
        k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, theta=theta, eps=eps
    )


def qk_norm_rope_store(
    k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, *, theta: float, eps: float, interpret=False
):
    """Public entry: q/k RMSNorm and RoPE of the qkv projection, and k/v written into the cache, in place.

    Args:
      k_cache, v_cache: [S, K, P, H] paged cache in the model dtype (not fp8); donated when called
        directly (rebind the result).
      qkv: [T, (N + 2K) * H] the projection output, columns [q heads | k heads | v heads].
      positions: [T] int32 each token's position (RoPE).
      slot_mapping: [T] int32 slot = page * P + offset, or -1 for a padding token (no write).
      q_norm, k_norm: [H] the RMSNorm weights, in the model dtype.
      theta: the RoPE base; eps: the RMSNorm epsilon (both static).
      interpret: run the Pallas kernel in interpret mode (tests on the CPU). Otherwise the CPU runs the
        jnp reference and a GPU the kernel.
    Returns:
      (q [T, N, H] normalized and rotated, k_cache, v_cache updated).
    """
    _check(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm)
    theta, eps = float(theta), float(eps)
    if jax.default_backend() == "cpu" and not interpret:
        return _qk_norm_rope_store_jnp(
            k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, theta=theta, eps=eps
        )
    head_dim = k_cache.shape[3]
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(
            f"the kernel loads each half of a head as one block: head_dim must be a power of two, got {head_dim}"
        )
    return _qk_norm_rope_store_pallas(
        k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, theta=theta, eps=eps, interpret=interpret
    )
