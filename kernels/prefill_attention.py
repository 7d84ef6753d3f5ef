"""Prefill attention over packed variable-length prompts, each with an optional cached prefix.

Backends, chosen by measurement (BENCHMARKS.md, "## Kernels"): on Hopper, bf16 inputs that
`supports_mgpu` accepts go to the Mosaic GPU kernel in prefill_attention_mgpu.py (wgmma + TMA, the faster
from 4k packed tokens up), everything else to the Triton-lowered kernel here, which also runs in interpret
mode on the CPU for the tests.

The Triton kernel: keys and values come from pages picked by the block table, the ragged edges need
masked loads and stores.

Work list: the packed new tokens are cut into blocks of `block_q` tokens that never straddle two
sequences (a short jnp pass builds the list, bounded by cdiv(T, block_q) + B + 1 entries); the padded
tail of the packed batch is one more pseudo-sequence with no keys, so its rows get 0. The grid is
(work block, kv head). A program takes the block's tokens times the G = N / K query heads of one kv
head as the rows of one [block_q * G, H] tile, so each K/V block is read once for the whole group (GQA
without repeated K/V). Keys are read from the paged cache (the engine stores the new tokens first),
causal by position: blocks wholly below the block's first position run without a mask, the rest with
the causal mask and masked loads (slots past the context may hold anything, NaN included).

fp8 caches (kv_layout.py) go to the Triton kernel: it decodes the e4m3 bytes in registers like the decode
kernel (`paged_attention.decode_e4m3`) and applies the per-key scales to the scores and the per-value
scales to the probabilities. The Mosaic GPU kernel takes bf16 caches only.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._checks import MIN_ROWS, check_triton_shapes
from ._checks import check_prefill as _check
from .paged_attention import FP8_DECODE, FP8_UNIT, MASK_VALUE, decode_e4m3, gather_pages
from .prefill_attention_mgpu import paged_prefill_attention_mgpu, supports_mgpu


def _prefill_kernel(
    work_ref,  # [NB, 5] int32, whole: per work block (sequence, q start, q end, first position, key end)
    tables_ref,  # [B, W] int32, whole
    q_ref,  # [T, N, H], whole (the block's rows are gathered)
    k_cache_ref,  # [S, K, P, H], whole
    v_cache_ref,  # [S, K, P, H], whole (uint8 e4m3 bytes with fp8)
    *refs,  # fp8 only: k_scale, v_scale [S, K, P] whole; then o [T, N, H] whole (rows scattered, masked)
    group: int,
    block_q: int,
    block_k: int,
    scale_log2: float,
    fp8: str | None,
):
    if fp8:
        ks_ref, vs_ref, o_ref = refs
    else:
        (o_ref,) = refs
    blk, head = pl.program_id(0), pl.program_id(1)
    num_tokens, _, head_dim = q_ref.shape
    block_size = k_cache_ref.shape[2]
    rows = block_q * group
    seq, q_start, q_end = work_ref[blk, 0], work_ref[blk, 1], work_ref[blk, 2]
    pos0, kv_end = work_ref[blk, 3], work_ref[blk, 4]

    @pl.when(q_start < q_end)  # spare entries of the work list do nothing
    def _():
        # Row r = (token r // G, head r % G); G is a power of two. (Integer `//` and `%` on vectors are
        # written as shifts, masks and lax.rem: the lowering mistypes jnp's versions with a constant.)
        r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
        r_tok = lax.shift_right_logical(r, jnp.int32(group.bit_length() - 1))
        r_head = lax.bitwise_and(r, jnp.int32(group - 1))
        tok = q_start + r_tok
        live = tok < q_end
        # Rows past the block's end wrap round the packed batch: distinct, in-range addresses, never stored.
        # [M, H] element indices (all-array: the interpret mode's masked store needs them). Measured: this
        # gather beat [block_q, G, H] slices plus a reshape (166 vs 201 us at 8k tokens).
        tok_addr = jnp.broadcast_to(lax.rem(tok, jnp.int32(num_tokens))[:, None], (rows, head_dim))
        q_head = jnp.broadcast_to((head * group + r_head)[:, None], (rows, head_dim))
        col = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 1)
        # The softmax scale (base 2) is folded into q once instead of into every score tile.
        q = (q_ref[tok_addr, q_head, col] * scale_log2).astype(q_ref.dtype)  # [M, H]
        row_pos = jnp.where(live, pos0 + r_tok, -1)  # a dead row attends to nothing

        def kv_slice(i):
            start = i * block_k  # block_k divides the page size: a block never straddles pages
            page = tables_ref[seq, lax.div(start, jnp.int32(block_size))]
            return (page, head, pl.ds(lax.rem(start, jnp.int32(block_size)), block_k), slice(None))

        def update(carry, k, v, allowed, scales=None):
            acc, m, l = carry
            if fp8:  # dequantize in registers: bytes to q's dtype, the scales on scores and probabilities
                ks, vs = scales
                k, v = decode_e4m3(k, q.dtype, fp8), decode_e4m3(v, q.dtype, fp8)
                s = plgpu.dot(q, k, trans_b=True) * (ks * FP8_UNIT[fp8])[None, :]  # [M, Bk] base-2 logits
            else:
                s = plgpu.dot(q, k, trans_b=True)  # [M, Bk] base-2 logits
            if allowed is not None:
                s = jnp.where(allowed, s, MASK_VALUE)
            m_next = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_next)
            p = jnp.exp2(s - m_next[:, None])
            l = l * alpha + p.sum(axis=1)
            pv = p * (vs * FP8_UNIT[fp8])[None, :] if fp8 else p  # value row j is bytes_j * vs_j
            acc = acc * alpha[:, None] + plgpu.dot(pv.astype(v.dtype), v)
            return acc, m_next, l

        def full_step(i, carry):
            idx = kv_slice(i)
            scales = (ks_ref[idx[:3]], vs_ref[idx[:3]]) if fp8 else None
            return update(carry, k_cache_ref[idx], v_cache_ref[idx], None, scales)

        def masked_step(i, carry):
            idx = kv_slice(i)
            k_pos = i * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            kv_mask = jnp.broadcast_to((k_pos < kv_end)[:, None], (block_k, head_dim))
            zero = 0 if fp8 else 0.0
            k = plgpu.load(k_cache_ref.at[idx], mask=kv_mask, other=zero)
            v = plgpu.load(v_cache_ref.at[idx], mask=kv_mask, other=zero)
            scales = None
            if fp8:  # NaN scales past the context must not reach a product
                ks = plgpu.load(ks_ref.at[idx[:3]], mask=k_pos < kv_end, other=0.0)
                vs = plgpu.load(vs_ref.at[idx[:3]], mask=k_pos < kv_end, other=0.0)
                scales = (ks, vs)
            return update(carry, k, v, k_pos[None, :] <= row_pos[:, None], scales)

        carry = (
            jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        # Keys [0, pos0] are visible to every live row and all stored: no mask there.
        num_full = lax.div(jnp.maximum(pos0 + 1, 0), jnp.int32(block_k))
        carry = lax.fori_loop(0, num_full, full_step, carry)
        carry = lax.fori_loop(num_full, pl.cdiv(kv_end, block_k), masked_step, carry)
        acc, _, l = carry
        o = jnp.where(l[:, None] > 0, acc / l[:, None], 0.0).astype(o_ref.dtype)
        plgpu.store(o_ref.at[tok_addr, q_head, col], o, mask=jnp.broadcast_to(live[:, None], o.shape))


def _work_list(cu_q_lens, context_lens, num_tokens, block_q):
    """[NB, 5] int32 work blocks: (sequence, q start, q end, first position, key end); spare rows are 0."""
    b = context_lens.shape[0]
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    # Sequences 0..B-1, then the padded tail of the packed batch as sequence B (no keys: output 0).
    starts = jnp.concatenate([cu_q_lens[:-1], cu_q_lens[-1:]])
    lens = jnp.concatenate([q_len, num_tokens - cu_q_lens[-1:]])
    first_pos = jnp.concatenate([context_lens - q_len, jnp.full((1,), -1, jnp.int32)])
    n_blocks = (lens + block_q - 1) // block_q
    j = jnp.arange(b + 1, dtype=jnp.int32)
    ends = jnp.sum(jnp.where(j[None, :] <= j[:, None], n_blocks[None, :], 0), axis=1)  # cumsum, one fusion
    nb = pl.cdiv(num_tokens, block_q) + b + 1  # >= sum(cdiv(lens, block_q)): static bound
    i = jnp.arange(nb, dtype=jnp.int32)
    # The sequence of block i: how many sequences end at or before it (a compare-and-sum, one small fusion;
    # jnp.searchsorted cost 60-130 us on the H100 here).
    s = jnp.sum(ends[None, :] <= i[:, None], axis=1, dtype=jnp.int32)
    used = s <= b
    s = jnp.minimum(s, b)
    local = i - (ends[s] - n_blocks[s])
    q_start = starts[s] + local * block_q
    q_end = starts[s] + lens[s]
    pos0 = first_pos[s] + local * block_q
    is_tail = s == b
    kv_end = jnp.where(is_tail, 0, pos0 + jnp.minimum(q_end - q_start, block_q))
    pos0 = jnp.where(is_tail, -1, pos0)
    work = jnp.stack([jnp.minimum(s, b - 1), q_start, q_end, pos0, kv_end], axis=1)
    return jnp.where(used[:, None], work, 0).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_q", "block_k", "num_warps", "num_stages", "interpret", "fp8"),
)
def _prefill_pallas(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    context_lens,
    k_scale,
    v_scale,
    *,
    fp8,
    scale,
    block_q,
    block_k,
    num_warps,
    num_stages,
    interpret,
):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    pad = max(0, block_q - num_tokens)  # the row wrap needs block_q <= T: pad tiny batches (cheap)
    if pad:
        q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    work = _work_list(cu_q_lens, context_lens, q.shape[0], block_q)
    kernel = functools.partial(
        _prefill_kernel,
        group=group,
        block_q=block_q,
        block_k=block_k,
        scale_log2=scale * math.log2(math.e),
        fp8=fp8,
    )
    o = pl.pallas_call(
        kernel,
        grid=(work.shape[0], num_kv_heads),
        in_specs=[
            pl.no_block_spec,  # work list [NB, 5]: scalar reads
            pl.no_block_spec,  # block_tables [B, W]: scalar reads of page ids
            pl.no_block_spec,  # q [T, N, H]: the block's (token, head) rows are gathered
            pl.no_block_spec,  # k_cache [S, K, P, H]: pages read through the block table
            pl.no_block_spec,  # v_cache [S, K, P, H]
        ]
        + [pl.no_block_spec] * (2 if fp8 else 0),  # fp8: k_scale, v_scale [S, K, P], read beside the pages
        out_specs=pl.no_block_spec,  # o [T, N, H]: the block's live rows are scattered
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(work, block_tables, q, k_cache, v_cache, *((k_scale, v_scale) if fp8 else ()))
    return o[:num_tokens] if pad else o


def paged_prefill_attention_reference(
    q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, *, scale=None, k_scale=None, v_scale=None
):
    """Causal prefill attention in plain jnp, reading all keys/values from the paged cache.

    The new tokens' K/V must already be stored in the cache (the engine stores, then attends).

    Args:
      q: [T, N, H] the new tokens of all sequences, packed; rows past cu_q_lens[-1] are padding (output 0).
      k_cache, v_cache: [S, K, P, H] paged cache; with k_scale and v_scale [S, K, P] float32 the fp8
        layout (uint8 e4m3 bytes, kv_layout.py), dequantized on read.
      block_tables: [B, W] int32 page ids per sequence.
      cu_q_lens: [B + 1] int32 cumulative new-token counts (cu_q_lens[0] == 0; padded sequences add 0).
      context_lens: [B] int32 total tokens per sequence (cached prefix + new tokens). The i-th new token
        of sequence b sits at position context_lens[b] - q_len[b] + i and attends to positions <= it.
      scale: softmax scale, default H ** -0.5.
    Returns:
      [T, N, H] in q's dtype.
    """
    T, N, H = q.shape
    _, K, P, _ = k_cache.shape
    B, W = block_tables.shape
    scale = H**-0.5 if scale is None else scale
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right").astype(jnp.int32) - 1, 0, B - 1)
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = context_lens[seq] - q_len[seq] + (t - cu_q_lens[seq])  # [T]
    live = t < cu_q_lens[-1]
    pos = jnp.where(live, pos, -1)  # a padded row attends to nothing

    def one_token(args):
        q_t, table, p = args  # [N, H], [W], []
        k = gather_pages(k_cache, k_scale, table)  # [K, L, H] float32
        v = gather_pages(v_cache, v_scale, table)
        valid = jnp.arange(W * P) <= p
        s = jnp.einsum("kgh,klh->kgl", q_t.reshape(K, N // K, H).astype(jnp.float32), k) * scale
        s = jnp.where(valid, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("kgl,klh->kgh", e, jnp.where(valid[None, :, None], v, 0.0))
        return (o / jnp.where(denom > 0, denom, 1.0)).reshape(N, H)

    # Tokens in chunks keep the gathered keys ([chunk, K, L, H]) small on the CPU.
    o = jax.lax.map(one_token, (q, block_tables[seq], pos), batch_size=min(T, 32))
    return o.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale",))
def _prefill_jnp(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, k_scale, v_scale, *, scale=None):
    return paged_prefill_attention_reference(
        q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, scale=scale, k_scale=k_scale, v_scale=v_scale
    )


def paged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    context_lens,
    *,
    scale=None,
    k_scale=None,
    v_scale=None,
    interpret=False,
    block_q=None,
    block_k=None,
    num_warps=None,
    num_stages=None,
    backend="auto",
    fp8_decode=None,
):
    """Public entry; same contract as `paged_prefill_attention_reference`.

    The CPU runs the jnp reference unless `interpret` (the Triton kernel in interpret mode, for tests).
    `backend`: "auto" (Mosaic GPU where `supports_mgpu` and no Triton tuning is given, else Triton),
    "mosaic" or "triton". `block_q` (tokens per program; default 64 rows of tokens x group heads),
    `block_k` (keys per step, default 64), `num_warps` (4) and `num_stages` (2) tune the Triton kernel;
    the defaults are within 5% of the best measured on the H100. (The Mosaic kernel's own tuning is in
    `prefill_attention_mgpu.paged_prefill_attention_mgpu`.) An fp8 cache (`k_scale`/`v_scale` given) runs
    the Triton kernel ("auto") or raises ValueError ("mosaic").
    """
    _check(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, k_scale, v_scale)
    fp8 = None if k_scale is None else (fp8_decode or FP8_DECODE)
    if fp8 and backend == "mosaic":
        raise ValueError("the Mosaic GPU prefill kernel reads bf16 caches only; fp8 caches run backend='triton'")
    if backend not in ("auto", "mosaic", "triton"):
        raise ValueError(f"backend must be 'auto', 'mosaic' or 'triton', got {backend!r}")
    triton_tuning = any(x is not None for x in (block_q, block_k, num_warps, num_stages))
    if backend == "mosaic" and triton_tuning:
        raise ValueError(
            "block_q, block_k, num_warps and num_stages tune the Triton kernel: drop them with backend='mosaic'"
            " (prefill_attention_mgpu.paged_prefill_attention_mgpu takes the Mosaic kernel's tuning)"
        )
    if jax.default_backend() == "cpu" and not interpret:
        return _prefill_jnp(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, k_scale, v_scale, scale=scale)
    if backend != "triton" and not interpret and not triton_tuning and not fp8:
        if supports_mgpu(q, k_cache):
            return paged_prefill_attention_mgpu(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, scale=scale)
        if backend == "mosaic":
            raise ValueError(
                "the Mosaic GPU prefill kernel needs a Hopper GPU, bf16, head_dim 64 or 128 and a power-of-two "
                "number of q heads per kv head (see supports_mgpu); use backend='triton' or 'auto'"
            )
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    group = q.shape[1] // num_kv_heads
    if group & (group - 1):
        raise ValueError(f"the kernel needs a power-of-two q heads per kv head, got {group}")
    if block_q is None:
        block_q = max(1, 64 // group)  # 64 rows: 1-11% faster than 128 at 16k-2k tokens (H100)
    block_q = max(block_q, MIN_ROWS // group)  # at least 16 rows per dot
    if block_k is None:
        block_k = 64 if q.dtype == jnp.bfloat16 else 32  # fp32 tiles: shared memory
    block_k = min(block_k, block_size & -block_size)  # a power of two dividing the page size
    check_triton_shapes(head_dim, block_size, block_k)
    scale = head_dim**-0.5 if scale is None else float(scale)
    num_warps = 4 if num_warps is None else num_warps
    num_stages = 2 if num_stages is None else num_stages
    return _prefill_pallas(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        context_lens,
        k_scale,
        v_scale,
        fp8=fp8,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
