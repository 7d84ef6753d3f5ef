"""Paged decode attention: one query token per sequence against its pages in the paged KV cache.

Backend: the Triton lowering of Pallas. Each program reads pages picked by a block table (a scalar
load, then a dynamic slice of the cache), masks the ragged tail with masked loads (so NaN in slots past
the context never enters a product), and runs in interpret mode on the CPU for the tests. It reads the
cache near the copy bandwidth at batch >= 64 (BENCHMARKS.md, "## Kernels"), so no Mosaic GPU version
was written.

Work split (flash-decoding): one program per (sequence, kv head), started longest context first. All G = N /
K query heads of one kv head share a program, so K/V are read once per kv head (GQA without repeats); the G
rows are padded to 16 (the smallest dot) by repeating the last head, and a masked store writes only the G
real rows into the [B, N, H] output. When batch x kv heads cannot fill the GPU, each context is cut into
equal runs of key blocks (cut at run time from the real context length; `num_splits` runs at most): the
(live row, kv head, run) items are dealt to a fixed grid of programs, the run count is chosen at run time
from the live rows (context > 0), so one live row in a 16-row batch still spreads over the GPU, and a second
small kernel merges the partial softmaxes. A row with context length 0 outputs 0.
fp32 caches run their dots as TF32 (relative error about 3e-4).

fp8 caches (kv_layout.py: uint8 bytes of e4m3 plus a float32 scale per key/value row): each tile is
loaded as uint8 and decoded in registers (exact: e4m3 fits bf16 and float16), the per-key scales
multiply the scores' columns and the per-value scales the probabilities' columns, so no element is
scaled. The bytes stay uint8 in memory; `fp8_decode` picks the decode (`decode_e4m3`) and the dots'
dtype: "native" and "int" decode to q's dtype, by the backend's float8 conversion or by integer ops
into a float16; "f16" (the default, the fastest on the H200) decodes to float16 by the backend's
conversion (one instruction per two elements on Hopper, where e4m3 -> bf16 takes more) and runs both
dots in float16, with q cast to
float16 (so |q| must stay below float16's 65504: Qwen3's q-norm keeps it far below) and each key
block's value scales divided by their max, so the probabilities times the scales stay in [0, 1] and do
not fall into float16's subnormals. V tiles are read as uint16 byte pairs and multiplied as two
half-width tiles (the even head dims, from the low bytes, and the odd ones), whose results are interleaved
once at the end: read as uint8, the value tile was the kernel's bottleneck (BENCHMARKS.md, which also has
the speed of each decode).

Addressing: the lowering computes element offsets in 32 bits (unsigned) for caches under 4 GiB and in
64 bits above, so a large per-layer cache does not wrap (tested on the GPU with a 4.4 GB cache).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._checks import MIN_ROWS, check_cache_and_scales, check_int32, check_query, check_triton_shapes
from .kv_layout import FP8_DTYPE, dequantize_fp8

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
MAX_SPLIT_ITEMS = 2048  # the most (row, kv head, split) partial softmaxes a split call has room for
FP8_DECODE = "f16"  # how the kernels turn e4m3 bytes into numbers: "native", "int" or "f16" (`decode_e4m3`)
F32_TINY = float(np.finfo(np.float32).tiny)
FP8_UNIT = {"native": 1.0, "int": 256.0, "f16": 1.0}  # decode_e4m3 returns value / FP8_UNIT


def decode_e4m3(x, dtype, how):
    """uint8 bytes of float8_e4m3fn -> `dtype` values times FP8_UNIT[how] (the caller's scale undoes it).

    "native": bitcast to float8_e4m3fn and convert (the backend's own fp8 conversion).
    "f16": the same through float16 (the decode kernel asks for float16 itself and runs its dots in it).
    "int": integer ops only. The e4m3 bits are placed in a float16: sign to bit 15, exponent and mantissa
    (7 bits) to bits 13..7, so the float16 holds value * 2**-8 exactly, subnormals included (float16's
    exponent bias is 8 above e4m3's, and a float16 subnormal is never flushed here), then converted.
    """
    if how not in FP8_UNIT:
        raise ValueError(f"fp8 decode must be one of {tuple(FP8_UNIT)}, got {how!r}")
    if how == "native":
        return lax.bitcast_convert_type(x, FP8_DTYPE).astype(dtype)
    if how == "f16":
        return lax.bitcast_convert_type(x, FP8_DTYPE).astype(jnp.float16).astype(dtype)
    i = x.astype(jnp.int16)
    bits = lax.shift_left(lax.bitwise_and(i, jnp.int16(0x80)), jnp.int16(8)) | lax.shift_left(
        lax.bitwise_and(i, jnp.int16(0x7F)), jnp.int16(7)
    )
    return lax.bitcast_convert_type(bits, jnp.float16).astype(dtype)


def _attend(refs, b, head, ctx, first, last, *, group, rows, block_k, scale_log2, fp8):
    """Sequence b's query heads of kv head `head` against its key blocks [first, last) (of context ctx):
    the unnormalized acc [R, H] and the running max m [R] and sum l [R] (base 2); R = G padded to 16."""
    tables_ref, q_ref, k_cache_ref, v_cache_ref, ks_ref, vs_ref = refs
    block_size, head_dim = k_cache_ref.shape[2:]

    def load_block(i):
        """Key block i: its valid mask [Bk], K and V tiles [Bk, H], and with fp8 their scales [Bk] (else None)."""
        start = i * block_k  # block_k divides the page size: a block never straddles pages
        page = tables_ref[b, lax.div(start, jnp.int32(block_size))]
        offset = lax.rem(start, jnp.int32(block_size))
        valid = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0) < ctx  # [Bk]
        kv_mask = jnp.broadcast_to(valid[:, None], (block_k, head_dim))
        zero = 0 if fp8 else 0.0
        k = plgpu.load(k_cache_ref.at[page, head, pl.ds(offset, block_k), :], mask=kv_mask, other=zero)
        v_mask = jnp.broadcast_to(valid[:, None], (block_k, v_cache_ref.shape[3]))  # fp8: H / 2 byte pairs
        v = plgpu.load(v_cache_ref.at[page, head, pl.ds(offset, block_k), :], mask=v_mask, other=zero)
        ks = vs = None
        if fp8:
            ks = plgpu.load(ks_ref.at[page, head, pl.ds(offset, block_k)], mask=valid, other=0.0)
            vs = plgpu.load(vs_ref.at[page, head, pl.ds(offset, block_k)], mask=valid, other=0.0)
        return valid, k, v, ks, vs

    # Padded rows repeat the group's last head: addresses stay in range; the masked stores drop their rows.
    row = lax.broadcasted_iota(jnp.int32, (rows,), 0)
    q = q_ref[b, head * group + jnp.minimum(row, group - 1), :]  # [R, H]
    if fp8 == "f16":
        q = q.astype(jnp.float16)

    def body(i, carry):
        acc, m, l = carry
        valid, k, v, ks, vs = load_block(i)
        if fp8:  # dequantize in registers: bytes to q's dtype here, the scales on scores and probabilities
            unit = FP8_UNIT[fp8]
            k = decode_e4m3(k, q.dtype, fp8)  # q.dtype: float16 with "f16"
            # v holds byte pairs: the even head dims in the low bytes, the odd ones in the high bytes
            v = (v.astype(jnp.uint8), lax.shift_right_logical(v, jnp.uint16(8)).astype(jnp.uint8))
            v = tuple(decode_e4m3(x, q.dtype, fp8) for x in v)
            s = plgpu.dot(q, k, trans_b=True) * (ks * (unit * scale_log2))[None, :]  # [R, Bk]
        else:
            s = plgpu.dot(q, k, trans_b=True) * scale_log2  # [R, Bk]
        s = jnp.where(valid[None, :], s, MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l = l * alpha + p.sum(axis=1)
        if fp8 == "f16":
            # p * vs (vs is amax / 448: 1e-6 and below happen) would fall into float16's subnormals or
            # to 0, so the block's vs are divided by their max and the dot's result multiplied by it.
            # Invalid keys load vs = 0 (and have p = 0): they add 0 and never raise vmax.
            vmax = jnp.maximum(vs.max(), F32_TINY)  # > 0 even for a block of zero rows
            pv = (p * (vs * (1.0 / vmax))[None, :]).astype(jnp.float16)  # in [0, 1]
            acc = tuple(a * alpha[:, None] + plgpu.dot(pv, x) * vmax for a, x in zip(acc, v, strict=True))
        elif fp8:
            pv = (p * (vs * FP8_UNIT[fp8])[None, :]).astype(q.dtype)  # value row j is bytes_j * vs_j
            acc = tuple(a * alpha[:, None] + plgpu.dot(pv, x) for a, x in zip(acc, v, strict=True))
        else:
            acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l

    # fp8: one accumulator for the even head dims and one for the odd, interleaved at the end
    acc = jnp.zeros((rows, head_dim // 2 if fp8 else head_dim), jnp.float32)
    acc = (acc, acc) if fp8 else acc
    m = jnp.full((rows,), MASK_VALUE, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    # Every block in [first, last) holds at least one valid key, so m is a real logit after the first.
    acc, m, l = lax.fori_loop(first, last, body, (acc, m, l))
    if fp8:
        acc = jnp.stack(acc, axis=-1).reshape(rows, head_dim)
    return acc, m, l


def _unpack_refs(refs, fp8):
    """A kernel's refs after its scalars -> (the inputs: tables, q, k, v, k_scale, v_scale (the scales None
    without fp8)), [the outputs]."""
    tables_ref, q_ref, k_ref, v_ref, *rest = refs
    ks_ref, vs_ref, *outs = rest if fp8 else (None, None, *rest)
    return (tables_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref), outs


def _row_masks(rows, group, head_dim):
    """Rows head*G .. head*G + R - 1 of the sequence: only the first G are this kv head's (the rest are
    masked; their addresses may be another head's rows or past the array, never written)."""
    mask = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group
    return mask, jnp.broadcast_to(mask[:, None], (rows, head_dim))


def _decode_kernel(lens_ref, order_ref, *refs, group, rows, block_k, scale_log2, fp8):
    """Grid (kv head, batch): one program per sequence and kv head, over its whole context. order [B] int32:
    the rows by context length, longest first; program (head, i) takes row order[i]. The GPU starts programs
    in grid order, the first axis fastest, so it starts the longest contexts first and the shortest last: a
    batch of ragged contexts does not end on one long row.

    refs: tables [B, W], q [B, N, H], k and v caches [S, K, P, H] (fp8: uint8 e4m3 bytes, v viewed as
    [S, K, P, H / 2] uint16 byte pairs), with fp8 k_scale and v_scale [S, K, P]; the output o [B, N, H]. All
    whole (rows gathered, pages read through the block table)."""
    inputs, (o_ref,) = _unpack_refs(refs, fp8)
    head, b = pl.program_id(0), order_ref[pl.program_id(1)]
    ctx = lens_ref[b]
    kw = dict(group=group, rows=rows, block_k=block_k, scale_log2=scale_log2, fp8=fp8)
    acc, m, l = _attend(inputs, b, head, ctx, 0, pl.cdiv(ctx, block_k), **kw)
    o = jnp.where(l[:, None] > 0, acc / l[:, None], 0.0).astype(o_ref.dtype)
    plgpu.store(o_ref.at[b, pl.ds(head * group, rows), :], o, mask=_row_masks(rows, group, o.shape[1])[1])


def _split_kernel(lens_ref, work_ref, *refs, group, rows, block_k, scale_log2, fp8):
    """Grid (programs,): the (live row, kv head, split) items dealt round-robin to the programs, so rows
    without context cost nothing. work_ref [2 + B] int32: the splits in use, the live row count, then the
    rows, live ones first. Each item stores its partial softmax: acc [B, slots, N, H] and m, l [B, slots, N]
    (running max and sum, base 2; slots: the grid's splits rounded up to a power of two), which
    `_merge_kernel` combines."""
    inputs, (acc_ref, m_ref, l_ref) = _unpack_refs(refs, fp8)
    num_kv_heads, head_dim = inputs[2].shape[1], inputs[2].shape[3]
    used, live, pid, num_programs = work_ref[0], work_ref[1], pl.program_id(0), pl.num_programs(0)
    kw = dict(group=group, rows=rows, block_k=block_k, scale_log2=scale_log2, fp8=fp8)
    mask, mask_2d = _row_masks(rows, group, head_dim)

    def item(j, carry):
        index = pid + j * num_programs
        split = lax.rem(index, used)
        head = lax.rem(lax.div(index, used), num_kv_heads)
        b = work_ref[2 + lax.div(index, used * num_kv_heads)]
        ctx = lens_ref[b]
        num_blocks = pl.cdiv(ctx, block_k)
        per_split = pl.cdiv(num_blocks, used)  # the context's key blocks cut into `used` runs
        first = split * per_split
        acc, m, l = _attend(inputs, b, head, ctx, first, jnp.minimum(first + per_split, num_blocks), **kw)
        heads = pl.ds(head * group, rows)
        plgpu.store(acc_ref.at[b, split, heads, :], acc, mask=mask_2d)
        plgpu.store(m_ref.at[b, split, heads], m, mask=mask)
        plgpu.store(l_ref.at[b, split, heads], l, mask=mask)
        return carry

    lax.fori_loop(0, pl.cdiv(live * num_kv_heads * used - pid, num_programs), item, 0)


def _merge_kernel(lens_ref, work_ref, acc_ref, m_ref, l_ref, o_ref):
    """Grid (batch, q head): one query head's partial softmaxes over the used splits, read at once ->
    o [B, N, H] (0 for a row without context). Reads only what the split kernel wrote."""
    b, n = pl.program_id(0), pl.program_id(1)
    splits, head_dim = acc_ref.shape[1], acc_ref.shape[3]
    used = jnp.where(lens_ref[b] > 0, work_ref[0], 0)
    valid = lax.broadcasted_iota(jnp.int32, (splits,), 0) < used
    m = plgpu.load(m_ref.at[b, :, n], mask=valid, other=MASK_VALUE)
    l = plgpu.load(l_ref.at[b, :, n], mask=valid, other=0.0)
    acc = plgpu.load(acc_ref.at[b, :, n, :], mask=jnp.broadcast_to(valid[:, None], (splits, head_dim)), other=0.0)
    w = jnp.exp2(m - m.max())  # empty splits (m = MASK_VALUE, l = 0, acc = 0) add nothing
    denom = (w * l).sum()
    o = (w[:, None] * acc).sum(axis=0) / jnp.where(denom > 0, denom, 1.0)
    o_ref[b, n, :] = o.astype(o_ref.dtype)


def _target_programs():
    """Programs that cover the SMs about twice (measured)."""
    return 2 * (getattr(jax.devices()[0], "core_count", None) or 132)  # interpret mode on CPU: an H100's


def _fourth_program_per_sm(programs):
    """Whether a grid needs a fourth program on some SM, but no fifth. With fp8 pages, 128-key tiles two stages
    deep fit three programs in an SM's shared memory, 64-key tiles three deep fit four, so there the smaller
    tiles run the grid in one wave instead of two (measured at batch 32-256: BENCHMARKS.md)."""
    sms = _target_programs() // 2
    return 3 * sms < programs <= 4 * sms


def _grid_splits(batch, num_kv_heads, max_blocks):
    """The most splits a call may use: what one live row would use, if the whole batch wants more than one
    split, within MAX_SPLIT_ITEMS partials."""
    want = _target_programs() // (batch * num_kv_heads)
    if want < 2:
        return 1
    cap = max(MAX_SPLIT_ITEMS // (batch * num_kv_heads), 2)
    return min(_pow2_floor(min(_target_programs() // num_kv_heads, cap)), _pow2_floor(max_blocks))


def _pow2_floor(n):
    return 1 << (max(n, 1).bit_length() - 1)


def _split_work(context_lens, num_kv_heads, grid_splits, fixed):
    """[2 + B] int32 for the split kernel: the splits in use (`fixed`, else a power of two covering the SMs
    about twice for the live rows, at most the grid's), the live row count, the rows with live ones first."""
    live = context_lens > 0
    num_live = jnp.sum(live, dtype=jnp.int32)
    if fixed:
        used = jnp.int32(grid_splits)
    else:
        want = jnp.maximum(_target_programs() // (jnp.maximum(num_live, 1) * num_kv_heads), 1)
        used = jnp.minimum(jnp.left_shift(jnp.int32(1), 31 - lax.clz(want)), grid_splits)
    rows = jnp.argsort(~live, stable=True).astype(jnp.int32)
    return jnp.concatenate([jnp.stack([used, num_live]), rows])


@functools.partial(
    jax.jit, static_argnames=("scale", "block_k", "num_splits", "num_warps", "num_stages", "interpret", "fp8")
)
def _decode_pallas(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    split_work,
    k_scale,
    v_scale,
    *,
    fp8,
    scale,
    block_k,
    num_splits,
    num_warps,
    num_stages,
    interpret,
):
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, _, _ = k_cache.shape
    group = num_heads // num_kv_heads
    rows = max(MIN_ROWS, pl.next_power_of_2(group))
    kw = dict(group=group, rows=rows, block_k=block_k, scale_log2=scale * math.log2(math.e), fp8=fp8)
    scales = (k_scale, v_scale) if fp8 else ()
    if fp8:  # V read as uint16 byte pairs: see `_attend`
        v_cache = lax.bitcast_convert_type(v_cache.reshape(*v_cache.shape[:3], head_dim // 2, 2), jnp.uint16)
    params = dict(
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )
    # All operands whole (pl.no_block_spec): pages are read through the block table, the group's query rows
    # gathered, and each program stores its G rows with masked stores.
    if num_splits == 1:
        order = jnp.argsort(-context_lens, stable=True).astype(jnp.int32)  # longest first
        (o,) = pl.pallas_call(
            functools.partial(_decode_kernel, **kw),
            grid=(num_kv_heads, batch),
            in_specs=[pl.no_block_spec] * (6 + len(scales)),
            out_specs=[pl.no_block_spec],
            out_shape=[jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype)],
            **params,
        )(context_lens, order, block_tables, q, k_cache, v_cache, *scales)
        return o
    slots = pl.next_power_of_2(num_splits)  # the merge loads all of a row's splits as one tile
    out_shape = [
        jax.ShapeDtypeStruct((batch, slots, num_heads, head_dim), jnp.float32),  # acc
        jax.ShapeDtypeStruct((batch, slots, num_heads), jnp.float32),  # m
        jax.ShapeDtypeStruct((batch, slots, num_heads), jnp.float32),  # l
    ]
    acc, m, l = pl.pallas_call(
        functools.partial(_split_kernel, **kw),
        grid=(min(batch * num_kv_heads * num_splits, _target_programs()),),
        in_specs=[pl.no_block_spec] * (6 + len(scales)),
        out_specs=[pl.no_block_spec] * 3,
        out_shape=out_shape,
        **params,
    )(context_lens, split_work, block_tables, q, k_cache, v_cache, *scales)
    (o,) = pl.pallas_call(
        _merge_kernel,
        grid=(batch, num_heads),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=[pl.no_block_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="paged_decode_attention_merge",
    )(context_lens, split_work, acc, m, l)
    return o


def gather_pages(cache, scale, tables):
    """cache [S, K, P, H] (uint8 with `scale` [S, K, P]: fp8) at tables [..., W] -> float32 [..., K, W*P, H]."""
    x = cache[tables]  # [..., W, K, P, H]
    x = x.astype(jnp.float32) if scale is None else dequantize_fp8(x, scale[tables])
    x = jnp.moveaxis(x, -3, -4)  # [..., K, W, P, H]
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def paged_decode_attention_reference(
    q, k_cache, v_cache, block_tables, context_lens, *, scale=None, k_scale=None, v_scale=None
):
    """Decode attention in plain jnp.

    Args:
      q: [B, N, H] one query per sequence.
      k_cache, v_cache: [S, K, P, H] paged cache (see `nanovllm_jax.kernels`); with k_scale and v_scale
        [S, K, P] float32 the fp8 layout (uint8 e4m3 bytes, kv_layout.py), dequantized on read.
      block_tables: [B, W] int32 page ids per sequence; entries past the context are never read
        for their values (they may point at any page, even one holding NaN).
      context_lens: [B] int32 tokens in the cache per sequence (0 for a padded row: output 0).
      scale: softmax scale, default H ** -0.5.
    Returns:
      [B, N, H] in q's dtype.
    """
    B, N, H = q.shape
    _, K, P, _ = k_cache.shape
    W = block_tables.shape[1]
    scale = H**-0.5 if scale is None else scale
    k = gather_pages(k_cache, k_scale, block_tables)  # [B, K, L, H] float32
    v = gather_pages(v_cache, v_scale, block_tables)
    valid = jnp.arange(W * P)[None, :] < context_lens[:, None]  # [B, L]
    qg = q.reshape(B, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("bkgh,bklh->bkgl", qg, k) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(valid[:, None, :, None], v, 0.0)  # NaN pages must not leak
    o = jnp.einsum("bkgl,bklh->bkgh", p, v) / jnp.where(denom > 0, denom, 1.0)
    return o.reshape(B, N, H).astype(q.dtype)


def _check(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale):
    check_cache_and_scales(k_cache, v_cache, k_scale, v_scale)
    check_query(q, k_cache, "[batch, q_heads, head_dim]")
    check_int32("block_tables", block_tables, 2)
    check_int32("context_lens", context_lens, 1)
    if block_tables.shape[0] != q.shape[0] or context_lens.shape[0] != q.shape[0]:
        raise ValueError(
            f"batch mismatch: q {q.shape[0]}, block_tables {block_tables.shape[0]},"
            f" context_lens {context_lens.shape[0]}"
        )


def _block_k(block_size, head_dim, dtype, block_k):
    """The key block: a power of two dividing the page size (fp32 tiles smaller: shared memory)."""
    if block_k is None:
        block_k = 256 if dtype == jnp.bfloat16 and head_dim <= 128 else 64
    block_k = min(block_k, block_size & -block_size)  # largest power of two dividing the page size
    check_triton_shapes(head_dim, block_size, block_k)
    return block_k


@functools.partial(jax.jit, static_argnames=("scale",))
def _decode_jnp(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale, *, scale=None):
    return paged_decode_attention_reference(
        q, k_cache, v_cache, block_tables, context_lens, scale=scale, k_scale=k_scale, v_scale=v_scale
    )


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    *,
    scale=None,
    k_scale=None,
    v_scale=None,
    interpret=False,
    block_k=None,
    num_splits=None,
    num_warps=4,
    num_stages=None,
    fp8_decode=None,
):
    """Public entry; same contract as `paged_decode_attention_reference`.

    The CPU runs the jnp reference unless `interpret` (the kernel in interpret mode, for tests).
    `block_k` (keys per step), `num_splits` (context splits, all used; by default the grid's count comes
    from batch x kv heads and the count used from the live rows at run time), `num_warps` and `num_stages`
    tune the kernel.
    `fp8_decode` ("native", "int" or "f16"; default FP8_DECODE) picks how an fp8 cache is decoded and the
    dots' dtype (module docstring).
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale)
    if fp8_decode is not None and fp8_decode not in FP8_UNIT:
        raise ValueError(f"fp8_decode must be one of {tuple(FP8_UNIT)}, got {fp8_decode!r}")
    if jax.default_backend() == "cpu" and not interpret:
        return _decode_jnp(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale, scale=scale)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    fp8 = None if k_scale is None else (fp8_decode or FP8_DECODE)
    tuned = block_k is None and num_stages is None
    block_k = _block_k(block_size, head_dim, q.dtype, block_k)  # fp8: the tile is decoded to q's dtype
    max_blocks = block_tables.shape[1] * block_size // block_k
    fixed = num_splits is not None
    num_splits = num_splits if fixed else _grid_splits(q.shape[0], num_kv_heads, max_blocks)
    split_work = _split_work(context_lens, num_kv_heads, num_splits, fixed) if num_splits > 1 else None
    if tuned and block_k > 64:
        # The fastest measured (BENCHMARKS.md): bf16 with one split, 64-key blocks three stages deep;
        # fp8, or with splits, 128-key blocks two deep, except where fp8 needs a fourth program on an SM.
        one_split_64 = num_splits == 1 and (not fp8 or _fourth_program_per_sm(q.shape[0] * num_kv_heads))
        block_k, num_stages = (64, 3) if one_split_64 else (128, 2)
    num_stages = 2 if num_stages is None else num_stages
    scale = head_dim**-0.5 if scale is None else float(scale)
    return _decode_pallas(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        split_work,
        k_scale,
        v_scale,
        fp8=fp8,
        scale=scale,
        block_k=block_k,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
