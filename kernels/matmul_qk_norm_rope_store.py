"""The qkv projection with attention's inputs in its epilogue: x @ w_qkv, q/k RMSNorm, RoPE, the K/V store.

A decode step otherwise runs per layer the qkv GEMM (gemm.py), which writes [T, (N+2K)H], and
`qk_norm_rope_store` (qk_norm_rope_store.py), which reads it back: two launches where one will do. Here
program (i, j) multiplies row tile i of x [T, D] by the weight columns of head j (of the N q heads, then the
K k heads, then the K v heads), as two [D, H/2] column tiles: the accumulators are the head's two halves,
which is what rotate-half RoPE pairs. It rounds them to the model dtype, as the GEMM's output is, and then
does what `qk_norm_rope_store` does to that head's rows, with its function (`norm_rope_halves`): a q head is
normalized, rotated and written to q [T, N, H]; a k head is normalized, rotated and stored at each row's
slot; a v head is stored. Rows whose slot is -1 (padding) store nothing. RoPE's cos/sin [T, H/2] come in as
operands (`rope_cos_sin`, XLA computes them once per step for all layers), so the rotation is
`apply_rope`'s exactly; they and the slots are loaded before the K loop.

Triton lowering of Pallas, as the GEMM and the store it fuses (the cache update needs
`input_output_aliases`); the caches are aliased to the outputs and the jitted entry donates them.
The entry is one call for every shape: where the kernel does not apply it runs the two kernels (or their
references) instead. That is: the CPU unless `interpret`; float32; rows not a multiple of 16 or above
`gemm.MAX_ROWS` (a prefill's token counts); and fp8 caches, whose quantizing epilogue compiled wrong on the
H200 (BENCHMARKS.md). Row tiles: the largest of 64/32/16 rows that still gives `gemm.MIN_PROGRAMS` programs
(`default_tiling`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nanovllm_jax.layers.rotary import rope_cos_sin

from . import gemm
from .gemm import Tiling
from .qk_norm_rope_store import (
    _check,
    norm_rope_halves,
    qk_norm_rope_store,
    qk_norm_rope_store_fp8,
    qk_norm_rope_store_fp8_reference,
    qk_norm_rope_store_reference,
)


def _kernel(
    slot_ref,  # [bm] int32: this row tile's slots
    cos_ref,  # [bm, H/2] model dtype: this row tile's
    sin_ref,  # [bm, H/2]
    q_norm_ref,  # [H] whole
    k_norm_ref,  # [H] whole
    x_ref,  # [bm, D]: this row tile
    w1_ref,  # [D, H/2]: head j's first half of columns
    w2_ref,  # [D, H/2]: its second half
    _k_in,  # the caches in, aliased with the outputs: never read
    _v_in,
    q_ref,  # [T, N, H] whole
    k_cache_ref,  # [S, K, P, H] whole
    v_cache_ref,
    eps: float,
    block_k: int,
):
    num_heads, num_kv_heads, block_size = q_ref.shape[1], k_cache_ref.shape[1], k_cache_ref.shape[2]
    block_m, half = cos_ref.shape
    i, j = pl.program_id(0), pl.program_id(1)

    def body(step, accs):
        ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        x = x_ref[:, ks]
        return tuple(
            acc + jnp.dot(x, w[ks, :], preferred_element_type=jnp.float32) for acc, w in zip(accs, (w1_ref, w2_ref))
        )

    cos, sin, slots = cos_ref[...], sin_ref[...], slot_ref[...]  # before the K loop: it hides their latency
    zeros = (jnp.zeros((block_m, half), jnp.float32),) * 2
    x1, x2 = (acc.astype(x_ref.dtype) for acc in lax.fori_loop(0, x_ref.shape[1] // block_k, body, zeros))
    cols = lax.broadcasted_iota(jnp.int32, (1, half), 1)
    col_halves = (cols, cols + half)  # [1, H/2] column indices of the halves

    def norm_rope(weight_ref):
        halves = (weight_ref[pl.ds(0, half)][None, :], weight_ref[pl.ds(half, half)][None, :])
        return norm_rope_halves(x1, x2, *halves, cos, sin, eps)

    @pl.when(j < num_heads)
    def _():
        rows = (i * block_m + lax.broadcasted_iota(jnp.int32, (block_m,), 0))[:, None]
        for c, y in zip(col_halves, norm_rope(q_norm_ref), strict=True):
            plgpu.store(q_ref.at[rows, j, c], y)

    live = slots >= 0
    mask = jnp.broadcast_to(live[:, None], (block_m, half))
    page, offset = jnp.where(live, slots // block_size, 0), jnp.where(live, slots % block_size, 0)  # -1: no address

    def store(cache_ref, head, row):
        """Rows [bm] as halves into the cache at kv head `head` and the rows' slots."""
        for c, y in zip(col_halves, row, strict=True):
            plgpu.store(cache_ref.at[page[:, None], head, offset[:, None], c], y, mask=mask)

    @pl.when((j >= num_heads) & (j < num_heads + num_kv_heads))
    def _():
        store(k_cache_ref, j - num_heads, norm_rope(k_norm_ref))

    @pl.when(j >= num_heads + num_kv_heads)
    def _():
        store(v_cache_ref, j - num_heads - num_kv_heads, (x1, x2))


@functools.partial(jax.jit, static_argnames=("theta", "eps", "tiling", "interpret"), donate_argnums=(0,))
def _fused_pallas(caches, x, w, positions, slot_mapping, q_norm, k_norm, *, theta, eps, tiling: Tiling, interpret):
    """The pallas_call over `caches` (k_cache, v_cache), donated. Returns (q, k_cache, v_cache)."""
    (t, d), head_dim = x.shape, caches[0].shape[3]
    num_kv_heads, half, bm = caches[0].shape[1], head_dim // 2, tiling.block_m
    num_heads = w.shape[1] // head_dim - 2 * num_kv_heads
    cos, sin = rope_cos_sin(positions, head_dim, theta, x.dtype)
    rows = pl.BlockSpec((bm, half), lambda i, j: (i, 0))
    whole = pl.BlockSpec((head_dim,), lambda i, j: (0,))
    first_cache = 8  # the operand index of caches[0]
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, block_k=tiling.block_k),
        grid=(t // bm, num_heads + 2 * num_kv_heads),  # row tiles vary fastest: they share a weight tile
        in_specs=[
            pl.BlockSpec((bm,), lambda i, j: (i,)),  # slot_mapping
            rows,  # cos
            rows,  # sin
            whole,  # q_norm
            whole,  # k_norm
            pl.BlockSpec((bm, d), lambda i, j: (i, 0)),  # x
            pl.BlockSpec((d, half), lambda i, j: (0, 2 * j)),  # w: head j's first half
            pl.BlockSpec((d, half), lambda i, j: (0, 2 * j + 1)),  # its second half
        ]
        + [pl.no_block_spec] * len(caches),
        out_specs=[pl.no_block_spec] * (1 + len(caches)),  # q [T, N, H] by rows; the caches at the slots
        out_shape=[jax.ShapeDtypeStruct((t, num_heads, head_dim), x.dtype)]
        + [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
        input_output_aliases={first_cache + i: 1 + i for i in range(len(caches))},
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="decode_matmul_qk_norm_rope_store",
    )(slot_mapping, cos, sin, q_norm, k_norm, x, w, w, *caches)


def default_tiling(m: int, num_heads_total: int, head_dim: int) -> Tiling:
    """The row tile (64, 32 or 16 rows) for x [M, D]: the largest whose grid (row tiles x the N + 2K heads)
    has `gemm.MIN_PROGRAMS` programs, else 16; K in steps of 128, four stages, four warps."""
    block_m = next((b for b in (64, 32) if m % b == 0 and m // b * num_heads_total >= gemm.MIN_PROGRAMS), 16)
    return Tiling(block_m=block_m, block_n=head_dim, block_k=128, split_k=1)


def _fused_tiling(x, head_dim, num_heads_total, fp8, tiling, interpret):
    """The tiling to run the fused kernel with, or None where the two kernels run instead."""
    (m, d), n = x.shape, num_heads_total * head_dim
    if fp8 or not (interpret or jax.default_backend() != "cpu") or x.dtype not in gemm.DTYPES:
        return None
    if tiling is not None:
        if not tiling.fits(m, d, n):
            raise ValueError(f"{tiling} does not tile x {x.shape} @ w [{d}, {n}]")
        return tiling
    if m > gemm.MAX_ROWS or m % gemm.ROW_MULTIPLE or head_dim < 32:
        return None  # head_dim < 32: a half would not be a whole dot (16 columns)
    tiling = default_tiling(m, num_heads_total, head_dim)
    return tiling if tiling.fits(m, d, n) else None


def matmul_qk_norm_rope_store_reference(x, w, caches, positions, slot_mapping, q_norm, k_norm, *, theta, eps):
    """The unfused references: `gemm.matmul_reference`, then the q/k norm, RoPE and store reference of the
    cache layout. Returns (q [T, N, H], caches)."""
    reference = qk_norm_rope_store_fp8_reference if len(caches) == 4 else qk_norm_rope_store_reference
    qkv = gemm.matmul_reference(x, w)
    q, *caches = reference(*caches, qkv, positions, slot_mapping, q_norm, k_norm, theta=theta, eps=eps)
    return q, tuple(caches)


def matmul_qk_norm_rope_store(
    x,
    w,
    caches: tuple,
    positions,
    slot_mapping,
    q_norm,
    k_norm,
    *,
    theta: float,
    eps: float,
    tiling: Tiling | None = None,
    interpret=False,
):
    """Public entry: the qkv projection x @ w, then q/k RMSNorm, RoPE and the K/V store, in one kernel where
    it applies (see the module docstring) and as `gemm.matmul` then `qk_norm_rope_store(_fp8)` elsewhere.

    Args:
      x: [T, D] the normed hidden states; w: [D, (N + 2K) * H] the qkv weight, columns [q | k | v] heads.
      caches: one layer's cache arrays (kv_layout.py): (k_cache, v_cache) [S, K, P, H] in the model dtype, or
        fp8's (k_cache, v_cache, k_scale, v_scale). Donated when called directly (rebind the result).
      positions, slot_mapping, q_norm, k_norm, theta, eps: as in `qk_norm_rope_store`.
      tiling: the fused kernel's tiles (block_n must be H, split_k 1); `default_tiling` if None.
      interpret: run the Pallas kernels in interpret mode (tests on the CPU).
    Returns:
      (q [T, N, H] normalized and rotated, the caches updated, as a tuple).
    """
    gemm._check(x, w, None)
    if len(caches) not in (2, 4):
        raise ValueError(f"caches must be (k_cache, v_cache) or fp8's four arrays, got {len(caches)} arrays")
    qkv = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)  # the projection's output, for the checks
    _check(caches[0], caches[1], qkv, positions, slot_mapping, q_norm, k_norm, scales=tuple(caches[2:]))
    theta, eps = float(theta), float(eps)
    _, num_kv_heads, _, head_dim = caches[0].shape
    if tiling is not None and (tiling.block_n != head_dim or tiling.split_k != 1):
        raise ValueError(f"the fused kernel's tiling needs block_n = head_dim ({head_dim}) and split_k 1, got {tiling}")
    fused = _fused_tiling(x, head_dim, w.shape[1] // head_dim, len(caches) == 4, tiling, interpret)
    args, kw = (positions, slot_mapping, q_norm, k_norm), dict(theta=theta, eps=eps, interpret=interpret)
    if fused is not None:
        q, *caches = _fused_pallas(tuple(caches), x, w, *args, tiling=fused, **kw)
    else:
        store = qk_norm_rope_store_fp8 if len(caches) == 4 else qk_norm_rope_store
        q, *caches = store(*caches, gemm.matmul(x, w, interpret=interpret), *args, **kw)
    return q, tuple(caches)
    store = qk_norm_rope_store_fp8 if len(caches) == 4 else qk_norm_rope_store
    q, *caches = store(
        *caches,
        gemm.matmul(x, w, interpret=interpret),
        positions,
        slot_mapping,
        q_norm,
        k_norm,
        theta=theta,
        eps=eps,
        interpret=interpret,
    )
    return q, tuple(caches)
