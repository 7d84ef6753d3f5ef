"""Attention inputs in one kernel: q/k RMSNorm, RoPE on q and k, and the K/V store into the paged cache.

Between the qkv projection and attention, a decode step of Qwen3 otherwise runs per layer a slice copy,
small XLA fusions for the q/k norms and RoPE, and the `store_kv` kernel; at small batches each is a
launch of a few microseconds. This kernel reads the projection output [T, (N+2K)*H] (the fused column
layout [q | k | v]) once and does all of it. Each program takes a block of one token's rows: program
(t, j) of the grid (T, ceil(N / Rq) + ceil(K / Rk)) either normalizes and rotates Rq of token t's q heads
and writes them, or Rk of its kv heads, whose k rows it normalizes and rotates and whose k and v rows it
writes at the token's slot (a slot of -1, a padding token, writes nothing under `pl.when`, so -1 never
becomes an address). Rows are loaded as [R, H/2] halves (rotate-half RoPE); a block past the last head
(Qwen3-14B's 40 q heads in blocks of 16) is masked. Small blocks suit a decode step's few tokens (more
programs to spread over the GPU), larger ones a prefill's thousands (`rows_per_program`, by token count,
measured in BENCHMARKS.md). The head dim must be a power of two (64 or 128 in Qwen3).

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
engine's jit the donation is the engine's). Rebind the result.

fp8 caches (`qk_norm_rope_store_fp8`, layout in kv_layout.py): the same kernel quantizes the k row (after
its norm and RoPE) and the v row in registers before writing their bytes and scales, with the formulas
`quantize_fp8` uses (`fp8_scale`, `fp8_bytes`), so the unfused path's XLA fusions and `store_kv_fp8` are
not run. The v bytes and scales are the reference's exactly; the k row is the
kernel's own normalized and rotated row, which can be an ulp off the reference's (its cos/sin), so a k
byte can be one e4m3 step off.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nanovllm_jax.layers.rotary import apply_rope, rope_inv_freq

from ._checks import check_cache, check_fp8_cache, check_int32
from .kv_layout import fp8_bytes, fp8_scale
from .kv_store import store_kv_fp8_reference, store_kv_reference
from .norms import rms_norm_reference

LARGE_CALL = 256  # tokens from which a program takes a block of rows rather than one (`default_tiling`)


def norm_rope_halves(x1, x2, w1, w2, cos, sin, eps):
    """RMSNorm then RoPE of rows given as their [R, H/2] halves, in the model dtype (x1's): the norm in
    float32, cast, times the weight halves w1, w2; then the rotation by cos, sin (model dtype, broadcast to
    [R, H/2]). Shared with the qkv projection's epilogue (matmul_qk_norm_rope_store.py)."""
    dtype, head_dim = x1.dtype, 2 * x1.shape[-1]
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    inv_rms = lax.rsqrt((jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / head_dim + eps)[:, None]
    x1, x2 = w1 * (x1 * inv_rms).astype(dtype), w2 * (x2 * inv_rms).astype(dtype)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def quantize_halves(x1, x2):
    """Rows as [R, H/2] halves -> (their e4m3 bytes as two halves, the scale [R]): `quantize_fp8`'s formulas,
    one scale a row."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    scale, inv = fp8_scale(jnp.maximum(jnp.max(jnp.abs(x1), axis=1), jnp.max(jnp.abs(x2), axis=1)))
    return fp8_bytes(x1, inv[:, None]), fp8_bytes(x2, inv[:, None]), scale


def _qk_norm_rope_store_kernel(
    pos_ref,  # [T] int32, whole
    slot_ref,  # [T] int32, whole
    inv_freq_ref,  # [H/2] float32, whole
    q_norm_ref,  # [H] q_norm weight, whole
    k_norm_ref,  # [H] k_norm weight, whole
    qkv_ref,  # [T, N + 2K, H] whole: token t's rows [q heads | k heads | v heads]
    *refs,  # the cache arrays in (aliased with the outputs: never read), q_ref, the cache arrays out
    eps: float,
    q_rows: int,
    kv_rows: int,
):
    """Program (t, j): token t's q heads j * Rq .. (j < ceil(N / Rq)), else its kv heads from (j - that) * Rk.
    The cache arrays are (k_cache, v_cache) [S, K, P, H], or fp8's (k_cache, v_cache, k_scale, v_scale) with
    uint8 pages and float32 scales [S, K, P]. q_ref [T, N, H]."""
    num_arrays = (len(refs) - 1) // 2
    q_ref, (k_cache_ref, v_cache_ref, *scale_refs) = refs[num_arrays], refs[num_arrays + 1 :]
    num_heads, num_kv_heads, block_size = q_ref.shape[1], k_cache_ref.shape[1], k_cache_ref.shape[2]
    head_dim = qkv_ref.shape[2]
    half, dtype = head_dim // 2, qkv_ref.dtype
    t, j = pl.program_id(0), pl.program_id(1)
    q_programs = pl.cdiv(num_heads, q_rows)
    halves = (pl.ds(0, half), pl.ds(half, half))  # of the norm weights
    cols = lax.broadcasted_iota(jnp.int32, (1, half), 1)
    col_halves = (cols, cols + half)  # [1, H/2] column indices of the halves (rows and columns index as arrays)

    def block(first, size, count):
        """Heads first .. first + size - 1 of `count`: their indices [R], which exist [R], and that as an
        [R, H/2] mask (indices past the last head are masked: never read or written)."""
        heads = first + lax.broadcasted_iota(jnp.int32, (size,), 0)
        real = heads < count
        return heads, real, jnp.broadcast_to(real[:, None], (size, half))

    def load(rows, mask):
        """qkv rows [R] of token t as ([R, H/2], [R, H/2]) halves (masked rows 0)."""
        return tuple(plgpu.load(qkv_ref.at[t, rows[:, None], c], mask=mask, other=0) for c in col_halves)

    def norm_rope(x, weight_ref):
        """RMSNorm then RoPE of [R, H/2] halves, row by row, in the model dtype."""
        angles = pos_ref[t].astype(jnp.float32) * inv_freq_ref[...]  # [H/2] float32
        cos, sin = (f(angles).astype(dtype)[None, :] for f in (jnp.cos, jnp.sin))
        return norm_rope_halves(*x, *(weight_ref[part][None, :] for part in halves), cos, sin, eps)

    @pl.when(j < q_programs)
    def _():
        heads, _, mask = block(j * q_rows, q_rows, num_heads)
        for c, x in zip(col_halves, norm_rope(load(heads, mask), q_norm_ref), strict=True):
            plgpu.store(q_ref.at[t, heads[:, None], c], x, mask=mask)

    slot = slot_ref[t]

    @pl.when((j >= q_programs) & (slot >= 0))  # slot -1: a padding token, nothing to write
    def _():
        page, offset = slot // block_size, slot % block_size
        heads, real, mask = block((j - q_programs) * kv_rows, kv_rows, num_kv_heads)
        k = norm_rope(load(num_heads + heads, mask), k_norm_ref)
        v = load(num_heads + num_kv_heads + heads, mask)
        if not scale_refs:
            for cache_ref, row in ((k_cache_ref, k), (v_cache_ref, v)):
                for c, x in zip(col_halves, row, strict=True):
                    plgpu.store(cache_ref.at[page, heads[:, None], offset, c], x, mask=mask)
            return
        for cache_ref, scale_ref, row in zip((k_cache_ref, v_cache_ref), scale_refs, (k, v), strict=True):
            *row_bytes, scale = quantize_halves(*row)
            for c, x in zip(col_halves, row_bytes, strict=True):
                plgpu.store(cache_ref.at[page, heads[:, None], offset, c], x, mask=mask)
            plgpu.store(scale_ref.at[page, heads, offset], scale, mask=real)


@functools.partial(
    jax.jit, static_argnames=("theta", "eps", "rows_per_program", "num_warps", "interpret"), donate_argnums=(0,)
)
def _qk_norm_rope_store_pallas(
    caches, qkv, positions, slot_mapping, q_norm, k_norm, *, theta, eps, rows_per_program, num_warps, interpret
):
    """The pallas_call over the cache arrays `caches` (either layout, donated). Returns (q, *caches)."""
    t = qkv.shape[0]
    _, num_kv_heads, _, head_dim = caches[0].shape
    num_rows = qkv.shape[1] // head_dim  # N + 2K
    num_heads = num_rows - 2 * num_kv_heads
    q_rows, kv_rows = rows_per_program
    first_cache = 6  # the operand index of caches[0]
    return pl.pallas_call(
        functools.partial(_qk_norm_rope_store_kernel, eps=eps, q_rows=q_rows, kv_rows=kv_rows),
        grid=(t, pl.cdiv(num_heads, q_rows) + pl.cdiv(num_kv_heads, kv_rows)),
        # All whole: positions, slot_mapping [T] (a scalar read per program); inv_freq [H/2]; the q_norm and
        # k_norm weights [H]; qkv [T, N+2K, H] (a bitcast of the projection); the cache arrays, aliased to
        # outputs 1, 2, ...
        in_specs=[pl.no_block_spec] * (first_cache + len(caches)),
        out_specs=[pl.no_block_spec] * (1 + len(caches)),  # q [T, N, H] by rows; the caches at the slots
        out_shape=[jax.ShapeDtypeStruct((t, num_heads, head_dim), qkv.dtype)]
        + [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
        input_output_aliases={first_cache + i: 1 + i for i in range(len(caches))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="qk_norm_rope_store" if len(caches) == 2 else "qk_norm_rope_store_fp8",
    )(
        positions,
        slot_mapping,
        rope_inv_freq(head_dim, theta),
        q_norm,
        k_norm,
        qkv.reshape(t, num_rows, head_dim),
        *caches,
    )


def _check(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, scales=()):
    """Input checks of both entries; `scales` is fp8's (k_scale, v_scale), empty for the "auto" layout."""
    if scales:
        check_fp8_cache(k_cache, v_cache, *scales)
        if qkv.dtype not in (jnp.bfloat16, jnp.float32):
            raise ValueError(f"qkv must be bfloat16 or float32 with an fp8 cache, got {qkv.dtype}")
    elif k_cache.dtype == jnp.uint8:
        raise ValueError("an fp8 cache (uint8 pages) goes to qk_norm_rope_store_fp8, with its scales")
    else:
        check_cache(k_cache, v_cache)
        if qkv.dtype != k_cache.dtype:
            raise ValueError(f"qkv dtype {qkv.dtype} must match the cache dtype {k_cache.dtype}")
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
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w.shape != (head_dim,) or w.dtype != qkv.dtype:
            raise ValueError(f"{name} weight must be [{head_dim}] {qkv.dtype}, got {w.shape} {w.dtype}")


def default_tiling(tokens: int) -> tuple[tuple[int, int], int]:
    """((q rows, kv rows) per program, warps) for a call of `tokens` tokens (measured: BENCHMARKS.md)."""
    return ((1, 1), 1) if tokens < LARGE_CALL else ((4, 2), 1)


def _launch(caches, qkv, positions, slot_mapping, q_norm, k_norm, theta, eps, rows_per_program, num_warps, interpret):
    """The kernel on checked inputs: the head dim and the tiles (default: by token count) checked."""
    head_dim = caches[0].shape[3]
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(
            f"the kernel loads each half of a head as one block: head_dim must be a power of two, got {head_dim}"
        )
    default_rows, default_warps = default_tiling(qkv.shape[0])
    rows_per_program = tuple(rows_per_program or default_rows)
    if len(rows_per_program) != 2 or any(r < 1 or r & (r - 1) for r in rows_per_program):
        raise ValueError(f"rows_per_program must be two powers of two (q rows, kv rows), got {rows_per_program}")
    num_warps = default_warps if num_warps is None else num_warps
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    return _qk_norm_rope_store_pallas(
        caches,
        qkv,
        positions,
        slot_mapping,
        q_norm,
        k_norm,
        theta=theta,
        eps=eps,
        rows_per_program=rows_per_program,
        num_warps=num_warps,
        interpret=interpret,
    )


def _split_norm_rope(qkv, positions, q_norm, k_norm, num_kv_heads, head_dim, theta, eps):
    """The unfused math: split qkv, RMSNorm q and k, RoPE. Returns q [T, N, H], k and v [T, K, H]."""
    t = qkv.shape[0]
    num_heads = qkv.shape[1] // head_dim - 2 * num_kv_heads
    q, k, v = jnp.split(qkv, [num_heads * head_dim, (num_heads + num_kv_heads) * head_dim], axis=-1)
    q = q.reshape(t, num_heads, head_dim)
    k, v = k.reshape(t, num_kv_heads, head_dim), v.reshape(t, num_kv_heads, head_dim)
    q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    return apply_rope(q, positions, theta), apply_rope(k, positions, theta), v


def qk_norm_rope_store_reference(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, *, theta, eps):
    """The unfused path: split qkv, RMSNorm q and k, RoPE, store k/v. Returns (q, k_cache, v_cache)."""
    _, num_kv_heads, _, head_dim = k_cache.shape
    q, k, v = _split_norm_rope(qkv, positions, q_norm, k_norm, num_kv_heads, head_dim, theta, eps)
    return q, *store_kv_reference(k_cache, v_cache, k, v, slot_mapping)


def qk_norm_rope_store_fp8_reference(
    k_cache, v_cache, k_scale, v_scale, qkv, positions, slot_mapping, q_norm, k_norm, *, theta, eps
):
    """The unfused path into an fp8 cache (`store_kv_fp8_reference`). Returns (q, k_cache, v_cache, k_scale,
    v_scale)."""
    _, num_kv_heads, _, head_dim = k_cache.shape
    q, k, v = _split_norm_rope(qkv, positions, q_norm, k_norm, num_kv_heads, head_dim, theta, eps)
    return q, *store_kv_fp8_reference(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping)


_qk_norm_rope_store_jnp = jax.jit(qk_norm_rope_store_reference, static_argnames=("theta", "eps"), donate_argnums=(0, 1))
_qk_norm_rope_store_fp8_jnp = jax.jit(
    qk_norm_rope_store_fp8_reference, static_argnames=("theta", "eps"), donate_argnums=(0, 1, 2, 3)
)


def qk_norm_rope_store(
    k_cache,
    v_cache,
    qkv,
    positions,
    slot_mapping,
    q_norm,
    k_norm,
    *,
    theta: float,
    eps: float,
    rows_per_program: tuple[int, int] | None = None,
    num_warps: int | None = None,
    interpret=False,
):
    """Public entry: q/k RMSNorm and RoPE of the qkv projection, and k/v written into the cache, in place.

    Args:
      k_cache, v_cache: [S, K, P, H] paged cache in the model dtype (fp8 caches: `qk_norm_rope_store_fp8`);
        donated when called directly (rebind the result).
      qkv: [T, (N + 2K) * H] the projection output, columns [q heads | k heads | v heads].
      positions: [T] int32 each token's position (RoPE).
      slot_mapping: [T] int32 slot = page * P + offset, or -1 for a padding token (no write).
      q_norm, k_norm: [H] the RMSNorm weights, in the model dtype.
      theta: the RoPE base; eps: the RMSNorm epsilon (both static).
      rows_per_program: (q rows, kv rows) a program takes, powers of two; num_warps: its warps. By
        default `default_tiling(T)`.
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
    caches = (k_cache, v_cache)
    tiles = (rows_per_program, num_warps)
    return _launch(caches, qkv, positions, slot_mapping, q_norm, k_norm, theta, eps, *tiles, interpret)


def qk_norm_rope_store_fp8(
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    qkv,
    positions,
    slot_mapping,
    q_norm,
    k_norm,
    *,
    theta: float,
    eps: float,
    rows_per_program: tuple[int, int] | None = None,
    num_warps: int | None = None,
    interpret=False,
):
    """Public entry for the fp8 layout: as `qk_norm_rope_store`, with k/v quantized into uint8 pages and scales.

    Args:
      k_cache, v_cache: [S, K, P, H] uint8 pages; k_scale, v_scale: [S, K, P] float32 (kv_layout.py). All
        four are donated when called directly (rebind the result).
      qkv, q_norm, k_norm: bfloat16 or float32; the rest as in `qk_norm_rope_store`.
    Returns:
      (q [T, N, H] in the dtype of qkv, k_cache, v_cache, k_scale, v_scale updated).
    """
    _check(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, scales=(k_scale, v_scale))
    theta, eps = float(theta), float(eps)
    if jax.default_backend() == "cpu" and not interpret:
        args = (k_cache, v_cache, k_scale, v_scale, qkv, positions, slot_mapping, q_norm, k_norm)
        return _qk_norm_rope_store_fp8_jnp(*args, theta=theta, eps=eps)
    caches = (k_cache, v_cache, k_scale, v_scale)
    tiles = (rows_per_program, num_warps)
    return _launch(caches, qkv, positions, slot_mapping, q_norm, k_norm, theta, eps, *tiles, interpret)
