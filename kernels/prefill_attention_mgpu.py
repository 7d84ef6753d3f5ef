"""Prefill attention over packed variable-length prompts: the Mosaic GPU (Hopper wgmma + TMA) version.

Same contract as `paged_prefill_attention` in prefill_attention.py, whose Triton-lowered kernel stays the
fallback and the CPU interpret path. Backend: Pallas' Mosaic GPU lowering (wgmma from shared memory fed
by TMA, warp-specialised); its speed against the Triton kernel, and what was tried to raise it, are in
BENCHMARKS.md ("## Kernels", `bash kernels/check_mgpu.sh bench`). Only bfloat16 with head_dim 64 or 128, a
power-of-two number of q heads per kv head (at most 16) and a page size that is a multiple of 64 run
here; `supports_mgpu` says which inputs qualify.

Design (FlashAttention-3 style, after JAX's attention_mgpu, but persistent and paged):
- Tiles: 64 rows per compute warpgroup, two compute warpgroups per program, so one tile holds 128 rows =
  `128 / G` tokens of one sequence times the G q heads of one kv head (G = 2: 64 tokens, each warpgroup
  one q head). Both warpgroups read the same K/V blocks (GQA without repeated K/V) and run the same key
  steps. Tiles start at multiples of 8 rows of the packed batch (a TMA copy into swizzled shared memory
  needs it: Mosaic addresses such a copy through 8-row tiles of global memory), so the first tile of a
  sequence may begin with up to 7 rows of the previous one and the last may end past it; those rows are
  computed but never stored. Whole tiles are stored with TMA copies from swizzled shared memory; the
  others (a sequence's first and last tiles, the padded tail of the batch) through a ladder of
  power-of-two row copies from an unswizzled buffer, so no row of another sequence is touched.
- Work items (tile, kv head) are listed sequence by sequence, kv head by kv head, by a short jnp pass
  that also cuts the list into one contiguous range per program of equal estimated cost (keys / 64 plus
  a per-tile overhead, in closed form). The grid is one program per SM (persistent): a memory warpgroup
  streams K/V blocks through a ring of `num_stages` shared-memory slots across all the program's items
  (pages picked by the block table; a block never straddles a page; page ids and item fields are read
  a step or an item ahead), and each compute warpgroup loads the next item's Q into its second Q slot
  while working on the current one.
- Causal by position: key blocks wholly at or below the tile's first valid position run without a mask;
  the rest mask key > row position and key >= the tile's key end (rows that are not the tile's own).
  Slots past a sequence's context may hold NaN: scores there are masked with `where`, and the rows of a
  V block past the context are zeroed in shared memory before the P @ V matmul (0 * NaN would leak
  otherwise; both compute warpgroups write the same values there, a benign race). Rows with no keys (the
  padded tail) output 0.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU's Pallas module imports on CPU builds too; guarded so that the package never fails.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

from ._checks import check_prefill as _check

ROWS = 64  # rows of one compute warpgroup's tile (the wgmma M)
NUM_COMPUTE_WG = 2
FIELDS = 8  # per item: sequence, tile row 0, valid tokens, first valid row, first position, key end, context, kv head
ALIGN = 8  # tiles start at multiples of 8 rows (the row tiling of swizzled shared memory)
TILE_COST = 1  # per-tile overhead in units of 64 keys, for the cost split between programs


def supports_mgpu(q, k_cache, block_kv=64):
    """Whether the Mosaic GPU kernel takes these inputs (else use the Triton kernel)."""
    if plgpu is None or jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and not str(capability).startswith("9"):
        return False  # wgmma is Hopper's (sm_90) alone
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    group = q.shape[1] // num_kv_heads
    return (
        q.dtype == jnp.bfloat16
        and k_cache.dtype == q.dtype
        and head_dim in (64, 128)
        and q.shape[1] % num_kv_heads == 0
        and group & (group - 1) == 0
        and group <= 16
        and block_size % min(block_kv, block_size) == 0
        and min(block_kv, block_size) % 64 == 0
    )


def _work_list(cu_q_lens, context_lens, num_tokens, tile, num_kv_heads, block_kv, num_programs):
    """Work items [NI, FIELDS] int32 and per-program item bounds [num_programs + 1] int32.

    Items are (sequence, kv head, tile) in that order; sequence B is the padded tail of the packed
    batch (no keys: its rows output 0). Spare rows (past the used items) are all 0.
    """
    b = context_lens.shape[0]
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    starts = jnp.concatenate([cu_q_lens[:-1], cu_q_lens[-1:]])
    lens = jnp.concatenate([q_len, num_tokens - cu_q_lens[-1:]])
    first_pos = jnp.concatenate([context_lens - q_len, jnp.zeros((1,), jnp.int32)])
    ctxs = jnp.concatenate([context_lens, jnp.zeros((1,), jnp.int32)])
    # Tiles start at multiples of ALIGN rows (a TMA copy into swizzled shared memory needs it): the first
    # tile of a sequence may start up to ALIGN - 1 rows before it (rows of the previous sequence, never
    # stored), the last one may run past its end.
    lead = starts % ALIGN
    n_tiles = jnp.where(lens > 0, (lead + lens + tile - 1) // tile, 0)
    n_items = n_tiles * num_kv_heads
    j = jnp.arange(b + 1, dtype=jnp.int32)
    ends = jnp.sum(jnp.where(j[None, :] <= j[:, None], n_items[None, :], 0), axis=1)  # inclusive cumsum
    # sum(cdiv(lead + L, tile)) <= T / tile + 2 (B + 1): a static bound on the items.
    ni = (num_tokens // tile + 2 * (b + 1)) * num_kv_heads
    i = jnp.arange(ni, dtype=jnp.int32)
    s = jnp.sum(ends[None, :] <= i[:, None], axis=1, dtype=jnp.int32)
    used = s <= b
    s = jnp.minimum(s, b)
    local = i - (ends[s] - n_items[s])
    nt = jnp.maximum(n_tiles[s], 1)
    head = local // nt
    z = local % nt
    row0 = starts[s] - lead[s] + z * tile  # the tile's first row, aligned
    first = jnp.maximum(lead[s] - z * tile, 0)  # its valid rows: [first, last)
    last = jnp.minimum(lead[s] + lens[s] - z * tile, tile)
    n = last - first
    # The last tile of the packed batch is read from T - tile on, so no copy leaves the array.
    t_load = jnp.minimum(row0, num_tokens - tile)
    d = first + row0 - t_load
    is_tail = s == b
    pos0 = jnp.where(is_tail, -1, first_pos[s] + row0 + first - starts[s])
    kv_end = jnp.where(is_tail, 0, pos0 + n)
    work = jnp.stack([jnp.minimum(s, b - 1), t_load, n, d, pos0, kv_end, ctxs[s], head], axis=1)
    work = jnp.where(used[:, None], work, 0).astype(jnp.int32)
    # Cost split: program p takes the items whose estimated cost midpoint falls in [p, p + 1) * total / P.
    # A tile's cost is estimated in closed form (its keys / 64 + a per-tile overhead), so its running sum
    # over the items needs no scan: a few small fused passes instead of a cumsum (measured on the H100:
    # this work list is a sizeable part of a short prefill).
    real = jnp.arange(b + 1) < b
    slope = jnp.where(real, tile / 64, 0.0)  # tile z of a sequence ends near key first_pos - lead + (z + 1) tile
    base = jnp.where(real, (first_pos - lead) / 64, 0.0) + TILE_COST
    nt_f = n_tiles.astype(jnp.float32)
    per_head = nt_f * base + slope * nt_f * (nt_f + 1) / 2  # one (sequence, kv head)'s tiles
    per_seq = per_head * num_kv_heads
    seq_before = jnp.sum(jnp.where(j[None, :] < j[:, None], per_seq[None, :], 0.0), axis=1)
    total = jnp.maximum(jnp.sum(per_seq), 1.0)
    z_f = z.astype(jnp.float32)
    before = seq_before[s] + head * per_head[s] + z_f * base[s] + slope[s] * z_f * (z_f + 1) / 2
    mid = jnp.where(used, (before + 0.5 * (base[s] + slope[s] * (z_f + 1))) / total, 3.0)
    # mid is in (0, 1) for used items: the last bound (2.0) counts them all, spare rows (3.0) never.
    p = jnp.concatenate([jnp.arange(num_programs, dtype=jnp.float32) / num_programs, jnp.full((1,), 2.0)])
    bounds = jnp.sum(mid[None, :] < p[:, None], axis=1, dtype=jnp.int32)
    return work, bounds


def _prefill_mgpu_kernel(
    work_ref,  # [NI, FIELDS] int32 (GMEM, scalar reads)
    bounds_ref,  # [programs + 1] int32
    tables_ref,  # [B, W] int32
    q_ref,  # [T, N, H]
    k_ref,  # [S, K, P, H]
    v_ref,  # [S, K, P, H]
    o_ref,  # [T, N, H]
    *,
    group,
    block_kv,
    num_stages,
    scale_log2,
    use_schedule_barrier,
    interpret,
):
    num_items = work_ref.shape[0]
    head_dim = q_ref.shape[-1]
    page_size = k_ref.shape[2]
    dtype = q_ref.dtype
    tile = NUM_COMPUTE_WG * ROWS // group  # tokens per tile

    def layout_cast(x, layout):  # (the CPU interpreter knows no layouts)
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(shape, dim):
        return layout_cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)

    chunk = min(tile, ROWS)  # rows of one (q head, token range) chunk of a warpgroup's 64 rows
    num_chunks = ROWS // chunk

    def scoped(q_smem3, k_smem, v_smem, o_union, k_bars, v_bars, q_bars, k_free, v_free, sched):
        ot_smem2, ou_smem2 = o_union  # one buffer, two layouts (a tile uses one of them)
        wg = lax.axis_index("wg")
        sm = lax.axis_index("sm")
        start = bounds_ref[sm]
        end = bounds_ref[sm + 1]

        def fields(i):
            i = jnp.minimum(i, num_items - 1)
            return tuple(work_ref[i, f] for f in range(FIELDS))

        def perform_schedule_barrier():
            if use_schedule_barrier:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(wg < NUM_COMPUTE_WG)
        def _compute_wg():
            plgpu.set_max_registers(232, action="increase")
            q_smem2 = q_smem3.at[wg]  # two Q slots: the next item's Q lands while this one runs
            ot_smem = ot_smem2.at[wg]
            ou_smem = ou_smem2.at[wg]

            def chunk_coords(c, kv_head):
                """(q head, token offset in the tile) of chunk c of this warpgroup's rows."""
                if group == 1:
                    return kv_head, wg * ROWS
                if group == 2:
                    return kv_head * 2 + wg, 0
                return kv_head * group + wg * num_chunks + c, 0

            def load_q(f, q_slot):
                _, t0, _, _, _, _, _, kv_head = f
                t0 = pl.multiple_of(t0, ALIGN)
                for c in range(num_chunks):
                    head, tok0 = chunk_coords(c, kv_head)
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[pl.ds(t0 + tok0, chunk), head],
                        q_smem2.at[q_slot, pl.ds(c * chunk, chunk)],
                        q_bars.at[wg * 2 + q_slot],
                    )

            first = fields(start)

            @pl.when(start < end)
            def _():
                load_q(first, 0)

            pl.when(wg == 1)(perform_schedule_barrier)

            def item_body(i, carry):
                g0, cur, nxt = carry[0], carry[1 : 1 + FIELDS], carry[1 + FIELDS :]
                _, t0, n, d, pos0, kv_end, ctx, kv_head = cur
                nxt2 = fields(i + 2)  # read an item ahead: no load latency on the critical path
                q_slot = lax.rem(i - start, 2)
                q_smem = q_smem2.at[q_slot]

                @pl.when(i + 1 < end)
                def _():
                    load_q(nxt, 1 - q_slot)  # that slot's last reader (item i - 1) is done

                nsteps = lax.div(kv_end + (block_kv - 1), block_kv)
                n_full = jnp.minimum(lax.div(jnp.maximum(pos0 + 1, 0), block_kv), jnp.maximum(nsteps - 1, 0))

                with jax.named_scope("wait_q"):
                    plgpu.barrier_wait(q_bars.at[wg * 2 + q_slot])

                    @pl.when(nsteps > 0)
                    def _():
                        plgpu.barrier_wait(k_bars.at[lax.rem(g0, num_stages)])

                def kv_step(step, carry, masked):
                    acc, m_i, l_i = carry
                    g = g0 + step
                    slot = lax.rem(g, num_stages)

                    with jax.named_scope("qk"):

                        def compute_qk(acc_ref):
                            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                            perform_schedule_barrier()
                            return acc_ref[...]

                        if interpret:  # the CPU interpreter has no transposed wgmma operands: a plain dot
                            qk = jnp.dot(q_smem[...], k_smem.at[slot][...].T, preferred_element_type=jnp.float32)
                            perform_schedule_barrier()
                        else:
                            qk = pl.run_scoped(compute_qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
                        plgpu.barrier_arrive(k_free.at[slot])

                    with jax.named_scope("softmax"):
                        if masked:
                            rows = iota((ROWS, block_kv), 0)
                            cols = iota((ROWS, block_kv), 1)
                            if group == 1:
                                tok = rows + wg * ROWS
                            elif group == 2:
                                tok = rows
                            else:
                                tok = lax.bitwise_and(rows, tile - 1)
                            base = step * block_kv
                            # Key k is visible to row r iff k <= pos(r) and k < the tile's key end (padding rows).
                            limit = jnp.minimum(tok + (pos0 - d - base), kv_end - 1 - base)
                            qk = jnp.where(cols <= limit, qk, -jnp.inf)

                        m_ij = jnp.maximum(m_i, qk.max(axis=1) * scale_log2)
                        alpha = jnp.exp2(m_i - m_ij)
                        m_i = m_ij
                        p = jnp.exp2(qk * scale_log2 - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
                        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                        l_i *= alpha
                        p16 = p.astype(dtype)
                        l_i += p.sum(axis=1)
                        acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))

                    with jax.named_scope("wait_v"):
                        if use_schedule_barrier:
                            plgpu.barrier_arrive(sched)  # done with the softmax
                        plgpu.barrier_wait(v_bars.at[slot])
                        if masked:
                            # Rows of V past the context may be NaN/Inf: zero them (p is 0 there, but 0 * NaN).
                            # Both compute warpgroups write the same values here (a benign race, on purpose:
                            # a rendezvous would cost more than the copy).
                            for r0 in range(0, block_kv, ROWS):
                                valid = ctx - step * block_kv - r0

                                @pl.when(valid < ROWS)
                                def _(r0=r0, valid=valid):
                                    v_rows = v_smem.at[slot].at[pl.ds(r0, ROWS)]
                                    v = v_rows[...]
                                    v_rows[...] = jnp.where(iota((ROWS, head_dim), 0) < valid, v, jnp.zeros_like(v))
                                    plgpu.commit_smem()

                        if use_schedule_barrier:
                            plgpu.barrier_wait(sched)

                    with jax.named_scope("pv"):

                        def wait_next_k():
                            @pl.when(step + 1 < nsteps)
                            def _():
                                plgpu.barrier_wait(k_bars.at[lax.rem(g + 1, num_stages)])

                        def compute_pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                            wait_next_k()

                        if interpret:  # (no run_state in the CPU interpreter)
                            acc = acc + jnp.dot(p16, v_smem.at[slot][...], preferred_element_type=jnp.float32)
                            wait_next_k()
                        else:
                            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                        plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_i, l_i

                acc = layout_cast(jnp.full((ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
                m_i = layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l_i = layout_cast(jnp.full((ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                carry = (acc, m_i, l_i)
                carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
                carry = lax.fori_loop(n_full, nsteps, functools.partial(kv_step, masked=True), carry)
                acc, m_i, l_i = carry

                with jax.named_scope("epilogue"):

                    @pl.when(n > 0)
                    def _epilogue():
                        inv_l = 1.0 / jnp.where(l_i > 0, l_i, 1.0)  # rows with no keys (the padding) output 0
                        out = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores left smem

                        full = (n == tile) & (d == 0)

                        @pl.when(full)
                        def _full():
                            ot_smem[...] = out
                            plgpu.commit_smem()
                            for c in range(num_chunks):
                                head, tok0 = chunk_coords(c, kv_head)
                                row = pl.multiple_of(t0, ALIGN) + tok0
                                plgpu.copy_smem_to_gmem(
                                    ot_smem.at[pl.ds(c * chunk, chunk)], o_ref.at[pl.ds(row, chunk), head]
                                )

                        @pl.when(jnp.logical_not(full))
                        def _partial():
                            # A ladder of power-of-two row copies stores exactly the valid rows.
                            ou_smem[...] = out
                            plgpu.commit_smem()
                            for c in range(num_chunks):
                                head, tok0 = chunk_coords(c, kv_head)
                                lo = jnp.maximum(d, tok0)  # the chunk's valid tile rows are [lo, hi)
                                count = jnp.maximum(jnp.minimum(d + n, tok0 + chunk) - lo, 0)
                                src = c * chunk + lo - tok0
                                dst = t0 + lo
                                size = chunk
                                while size >= 1:

                                    @pl.when(lax.bitwise_and(count, size) != 0)
                                    def _(size=size, src=src, dst=dst, head=head):
                                        plgpu.copy_smem_to_gmem(
                                            ou_smem.at[pl.ds(src, size)], o_ref.at[pl.ds(dst, size), head]
                                        )

                                    src = src + lax.bitwise_and(count, size)
                                    dst = dst + lax.bitwise_and(count, size)
                                    size //= 2

                return (g0 + nsteps, *nxt, *nxt2)

            lax.fori_loop(start, end, item_body, (jnp.int32(0), *first, *fields(start + 1)))
            pl.when(wg == 0)(perform_schedule_barrier)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == NUM_COMPUTE_WG)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")

            def mem_fields(i):
                i = jnp.minimum(i, num_items - 1)
                return work_ref[i, 0], work_ref[i, 5], work_ref[i, 7]

            def item_body(i, carry):
                g0, seq, kv_end, kv_head, page0, *nxt = carry
                # The next item's first page and the one after's fields are read now, an item ahead.
                nxt_page0 = tables_ref[nxt[0], 0]
                nxt2 = mem_fields(i + 2)
                nsteps = lax.div(kv_end + (block_kv - 1), block_kv)
                last_page = jnp.maximum(lax.div(kv_end - 1, page_size), 0)

                def kv_step(step, carry):
                    g, page = carry
                    key0 = step * block_kv
                    # The next step's page id is read now, so its latency hides behind this step's waits.
                    next_page = tables_ref[seq, jnp.minimum(lax.div(key0 + block_kv, page_size), last_page)]
                    idx = (page, kv_head, pl.ds(lax.rem(key0, page_size), block_kv))
                    slot = lax.rem(g, num_stages)

                    with jax.named_scope("mem_wait_k"):

                        @pl.when(g >= num_stages)
                        def _():
                            plgpu.barrier_wait(k_free.at[slot])

                    plgpu.copy_gmem_to_smem(k_ref.at[idx], k_smem.at[slot], k_bars.at[slot])
                    with jax.named_scope("mem_wait_v"):

                        @pl.when(g >= num_stages)
                        def _():
                            plgpu.barrier_wait(v_free.at[slot])

                    plgpu.copy_gmem_to_smem(v_ref.at[idx], v_smem.at[slot], v_bars.at[slot])
                    return g + 1, next_page

                g, _ = lax.fori_loop(0, nsteps, kv_step, (g0, page0))
                return (g, *nxt, nxt_page0, *nxt2)

            first = mem_fields(start)
            carry = (jnp.int32(0), *first, tables_ref[first[0], 0], *mem_fields(start + 1))
            g_end, *_ = lax.fori_loop(start, end, item_body, carry)
            # Observe the last blocks' release too, so every barrier phase is awaited once by each side.
            for k in range(num_stages):
                last = g_end - num_stages + k

                @pl.when(last >= 0)
                def _(last=last):
                    plgpu.barrier_wait(k_free.at[lax.rem(last, num_stages)])
                    plgpu.barrier_wait(v_free.at[lax.rem(last, num_stages)])

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    swizzled = dict(transforms=(tiling, swizzle))
    o_scratch = (
        plgpu.SMEM((NUM_COMPUTE_WG, ROWS, head_dim), dtype, **swizzled),  # O of full tiles
        plgpu.SMEM((NUM_COMPUTE_WG, ROWS, head_dim), dtype),  # O of short tiles (row-exact ladder)
    )
    if not interpret:  # (the CPU interpreter of jax 0.10 has no ref unions)
        o_scratch = plgpu.RefUnion(*o_scratch)
    pl.run_scoped(
        scoped,
        plgpu.SMEM((NUM_COMPUTE_WG, 2, ROWS, head_dim), dtype, **swizzled),  # Q, two slots per warpgroup
        plgpu.SMEM((num_stages, block_kv, head_dim), dtype, **swizzled),  # K ring
        plgpu.SMEM((num_stages, block_kv, head_dim), dtype, **swizzled),  # V ring
        o_scratch,
        plgpu.Barrier(num_barriers=num_stages),  # K block landed
        plgpu.Barrier(num_barriers=num_stages),  # V block landed
        plgpu.Barrier(num_arrivals=num_chunks, num_barriers=2 * NUM_COMPUTE_WG),  # Q tile landed
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WG, num_barriers=num_stages),  # K slot free
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WG, num_barriers=num_stages),  # V slot free
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WG),  # ping-pong schedule
        collective_axes="wg",
    )


def _num_sms():
    try:
        return int(jax.devices()[0].core_count)
    except Exception:  # noqa: BLE001 (an attribute some backends lack)
        return 132


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_kv", "num_stages", "num_programs", "use_schedule_barrier", "interpret"),
)
def _prefill_mgpu(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    context_lens,
    *,
    scale,
    block_kv,
    num_stages,
    num_programs,
    use_schedule_barrier,
    interpret=None,
):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    tile = NUM_COMPUTE_WG * ROWS // group
    # A tile's copies must fit in the packed batch, whose length the 8-row tiling must divide: pad batches
    # shorter than a tile or not a multiple of 8 rows (a copy of q; none for the usual token buckets).
    pad = max(tile, -(-num_tokens // ALIGN) * ALIGN) - num_tokens
    if pad:
        q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    work, bounds = _work_list(cu_q_lens, context_lens, q.shape[0], tile, num_kv_heads, block_kv, num_programs)
    o = _kernel_call(
        work,
        bounds,
        block_tables,
        q,
        k_cache,
        v_cache,
        scale=scale,
        block_kv=block_kv,
        num_stages=num_stages,
        num_programs=num_programs,
        use_schedule_barrier=use_schedule_barrier,
        interpret=interpret,
    )
    return o[:num_tokens] if pad else o


def _kernel_call(
    work,
    bounds,
    block_tables,
    q,
    k_cache,
    v_cache,
    *,
    scale,
    block_kv,
    num_stages,
    num_programs,
    use_schedule_barrier,
    interpret=None,
    profile_dir=None,
    profile_space=0,
):
    """The pallas kernel on a prepared work list (q padded to a multiple of 8 rows, at least one tile)."""
    group = q.shape[1] // k_cache.shape[1]
    params = dict(approx_math=True)
    if profile_dir:  # Mosaic GPU's profiler: a trace of the named scopes per warpgroup, written per call
        params.update(profile_space=profile_space, profile_dir=profile_dir)
    kernel = functools.partial(
        _prefill_mgpu_kernel,
        group=group,
        block_kv=block_kv,
        num_stages=num_stages,
        scale_log2=scale * math.log2(math.e),
        use_schedule_barrier=use_schedule_barrier,
        interpret=interpret is not None,
    )
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(num_programs,),
        grid_names=("sm",),
        num_threads=NUM_COMPUTE_WG + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(**params),
        interpret=interpret,
    )(work, bounds, block_tables, q, k_cache, v_cache)


def paged_prefill_attention_mgpu(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    context_lens,
    *,
    scale=None,
    block_kv=64,
    num_stages=3,
    num_programs=None,
    use_schedule_barrier=False,
):
    """The Mosaic GPU kernel; same contract as `paged_prefill_attention_reference` (prefill_attention.py).

    Needs a Hopper GPU and inputs that `supports_mgpu` accepts. `block_kv` (keys per step, a multiple of
    64 dividing the page size), `num_stages` (K/V ring depth; shared memory holds 64 x 4 or 128 x 2 keys
    at head_dim 128), `num_programs` (default: one per SM) and `use_schedule_barrier` (attention_mgpu's
    ping-pong between the two compute warpgroups) tune it; the defaults were the fastest measured.
    """
    _check(q, k_cache, v_cache, block_tables, cu_q_lens, context_lens)
    _, _, block_size, head_dim = k_cache.shape
    block_kv = min(block_kv, block_size)
    if not supports_mgpu(q, k_cache, block_kv):
        raise ValueError(
            "the Mosaic GPU prefill kernel needs a GPU, bf16, head_dim 64 or 128, a power-of-two group"
            f" <= 16 and a page size that is a multiple of 64; got q {q.shape} {q.dtype}, cache {k_cache.shape}"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    return _prefill_mgpu(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_q_lens,
        context_lens,
        scale=scale,
        block_kv=block_kv,
        num_stages=num_stages,
        num_programs=num_programs or _num_sms(),
        use_schedule_barrier=use_schedule_barrier,
    )
