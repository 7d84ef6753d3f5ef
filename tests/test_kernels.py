"""Pallas kernels against their jnp references.

On the CPU the Triton-lowered kernels run in interpret mode on tiny shapes (interpret mode is slow);
the `gpu` tests run the compiled kernels on real sizes (Qwen3-0.6B heads, pages of 256). Every case
fills the cache slots that no sequence owns with NaN, permutes the pages, and compares the written
cache bit-exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    store_kv,
    store_kv_reference,
)

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU  # CPU: the kernels in interpret mode; GPU: compiled
TOL = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}  # max |out - ref| / max |ref|; fp32 dots run as TF32


def _paged_cache(rng, num_pages, kv_heads, block_size, head_dim, dtype, tables, context_lens):
    """Random K/V caches [S, K, P, H]; every slot outside the sequences' contexts holds NaN."""
    shape = (num_pages, kv_heads, block_size, head_dim)
    k, v = rng.standard_normal(shape), rng.standard_normal(shape)
    owned = np.zeros((num_pages, block_size), bool)
    for table, length in zip(tables, context_lens, strict=True):
        for t in range(length):
            owned[table[t // block_size], t % block_size] = True
    k.transpose(0, 2, 1, 3)[~owned] = np.nan
    v.transpose(0, 2, 1, 3)[~owned] = np.nan
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _caches_over_4gib():
    """K and V caches of 8448 pages x 8 kv heads x 256 x 128 bf16: 4.4 GB each, past 2**31 elements."""
    num_pages = 8448
    shape = (num_pages, 8, 256, 128)
    k_cache = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    v_cache = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
    return num_pages, k_cache, v_cache


def _tables(rng, batch, width, num_pages):
    """[B, W] permuted page ids, each page used once (table entries past a context point anywhere)."""
    return rng.permutation(num_pages)[: batch * width].reshape(batch, width).astype(np.int32)


def _assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any(), "NaN in the kernel output"
    assert not np.isnan(ref).any()
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < TOL[dtype], f"relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (1, 128)])
def test_store_kv_bit_exact(dtype, kv_heads, head_dim):
    rng = np.random.default_rng(0)
    num_pages, block_size, tokens = 5, 16, 12
    shape = (num_pages, kv_heads, block_size, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    k = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    slots = rng.permutation(num_pages * block_size)[:tokens].astype(np.int32)
    slots[[2, 7]] = -1  # padding tokens: skipped
    slots[5] = num_pages * block_size - 1  # the very last slot
    want_k, want_v = store_kv_reference(k_cache, v_cache, k, v, jnp.asarray(slots))
    before_k, before_v = np.asarray(k_cache), np.asarray(v_cache)
    got_k, got_v = store_kv(k_cache, v_cache, k, v, jnp.asarray(slots), interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    # Untouched slots stay as they were; written ones hold the new rows.
    written = np.zeros((num_pages, block_size), bool)
    written[slots[slots >= 0] // block_size, slots[slots >= 0] % block_size] = True
    np.testing.assert_array_equal(
        np.asarray(got_k).transpose(0, 2, 1, 3)[~written], before_k.transpose(0, 2, 1, 3)[~written]
    )
    np.testing.assert_array_equal(
        np.asarray(got_v).transpose(0, 2, 1, 3)[~written], before_v.transpose(0, 2, 1, 3)[~written]
    )
    live = slots >= 0
    np.testing.assert_array_equal(
        np.asarray(got_k)[slots[live] // block_size, :, slots[live] % block_size], np.asarray(k)[live]
    )


def test_store_kv_under_outer_jit_donated():
    """The engine's use: the entry inside its own jitted step, the caches donated by that jit."""
    rng = np.random.default_rng(1)
    shape = (3, 2, 16, 64)
    k_cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.bfloat16)
    slots = jnp.asarray([3, -1, 47, 16], jnp.int32)
    want = store_kv_reference(k_cache, v_cache, k, k, slots)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(k_cache, v_cache, k, slots):
        return store_kv(k_cache, v_cache, k, k, slots, interpret=INTERPRET)

    got = step(k_cache, v_cache, k, slots)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_store_kv_input_checks():
    cache = jnp.zeros((2, 2, 16, 64), jnp.bfloat16)
    k = jnp.zeros((3, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(cache, cache, k, k, jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match="tokens, kv_heads, head_dim"):
        store_kv(cache, cache, k[:, :1], k[:, :1], jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="dtype"):
        store_kv(cache, cache, k.astype(jnp.float32), k.astype(jnp.float32), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="must match"):
        store_kv(cache, cache.astype(jnp.float32), k, k, jnp.zeros((3,), jnp.int32))


# ---------------------------------------------------------------------------------------------- decode


def _decode_case(context_lens, q_heads, kv_heads, head_dim, block_size, dtype, width, seed=0, **kw):
    rng = np.random.default_rng(seed)
    batch = len(context_lens)
    num_pages = batch * width + 2
    tables = _tables(rng, batch, width, num_pages)
    k_cache, v_cache = _paged_cache(rng, num_pages, kv_heads, block_size, head_dim, dtype, tables, context_lens)
    q = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), dtype)
    args = (q, k_cache, v_cache, jnp.asarray(tables), jnp.asarray(context_lens, jnp.int32))
    out = paged_decode_attention(*args, interpret=INTERPRET, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = paged_decode_attention_reference(*args)
    _assert_close(out, ref, dtype)
    for b, length in enumerate(context_lens):
        if length == 0:  # a padded row outputs exactly 0
            np.testing.assert_array_equal(np.asarray(out[b], np.float32), 0.0)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_gqa_dtypes(group, dtype):
    # Page 32, blocks of 16 keys: lengths 1, P-1, P, P+1, long, and a padded row. Each program stores its
    # G rows of the [B, N, H] output; its 16 - G padded rows fall on the next head's rows (G = 3: unaligned).
    _decode_case([1, 31, 32, 33, 100, 0], 2 * group, 2, 64, 32, dtype, width=4, block_k=16, num_splits=1)


def test_decode_rows_start_longest_first():
    # One split: programs take the rows by context, longest first; ties, padded rows and an unsorted batch
    # must still land in their own rows.
    _decode_case([33, 0, 100, 33, 1, 100, 0, 64], 4, 2, 64, 32, jnp.bfloat16, width=4, block_k=16, num_splits=1)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_decode_splits(num_splits):
    # Splits cut the real context; some splits get no block (short rows), a padded row gets none at all.
    _decode_case([1, 33, 127, 0], 4, 2, 128, 32, jnp.bfloat16, width=4, block_k=16, num_splits=num_splits)


@pytest.mark.parametrize("live", [1, 9, 16])
def test_decode_splits_from_live_rows(live):
    # Default splits on a 16-row batch: the grid has room for 8 splits, the kernel uses 8 for 1 live row
    # and 4 for 9 or 16 (interpret mode counts an H100's 132 SMs); the unused splits' partials are never
    # written, and the merge must not read them.
    lens = [1, 77, 128, 33, 100, 64, 5, 127, 16, 17, 90, 2, 111, 65, 31, 128][:live] + [0] * (16 - live)
    _decode_case(lens, 8, 4, 32, 32, jnp.bfloat16, width=4, block_k=16)


def test_decode_page_256_default_tuning():
    # The contract's page size with the entry's own block size and split choice (8 splits here); lengths 1,
    # P-1, P, P+1.
    _decode_case([1, 255, 256, 257], 4, 2, 64, 256, jnp.float32, width=2)


def test_decode_input_checks():
    cache = jnp.zeros((4, 2, 16, 64), jnp.bfloat16)
    q = jnp.zeros((2, 4, 64), jnp.bfloat16)
    tables, lens = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention(q[:, :3], cache, cache, tables, lens)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q[..., :32], cache, cache, tables, lens)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.astype(jnp.float32), cache, cache, tables, lens)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, cache, cache, tables.astype(jnp.float32), lens)
    with pytest.raises(ValueError, match="batch mismatch"):
        paged_decode_attention(q, cache, cache, tables[:1], lens)
    with pytest.raises(ValueError, match="page size"):
        bad = jnp.zeros((4, 2, 8, 64), jnp.bfloat16)
        paged_decode_attention(q, bad, bad, tables, lens, interpret=True)


# --------------------------------------------------------------------------------------------- prefill


def _prefill_case(q_lens, prefix_lens, q_heads, kv_heads, head_dim, block_size, dtype, width, pad=0, seed=0, **kw):
    rng = np.random.default_rng(seed)
    batch = len(q_lens)
    context_lens = [a + b for a, b in zip(q_lens, prefix_lens, strict=True)]
    num_pages = batch * width + 2
    tables = _tables(rng, batch, width, num_pages)
    k_cache, v_cache = _paged_cache(rng, num_pages, kv_heads, block_size, head_dim, dtype, tables, context_lens)
    tokens = sum(q_lens) + pad
    q = jnp.asarray(rng.standard_normal((tokens, q_heads, head_dim)), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    args = (q, k_cache, v_cache, jnp.asarray(tables), cu, jnp.asarray(context_lens, jnp.int32))
    out = paged_prefill_attention(*args, interpret=INTERPRET, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, paged_prefill_attention_reference(*args), dtype)
    if pad:  # padded rows of the packed batch output exactly 0
        np.testing.assert_array_equal(np.asarray(out[sum(q_lens) :], np.float32), 0.0)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_prefill_gqa_dtypes(group, dtype):
    # Prompts of 1, P-1, P, P+1 new tokens; cached prefixes (a prefix alone over a page edge); an empty
    # (padded) sequence; padded rows at the end of the packed batch.
    _prefill_case(
        [1, 15, 16, 17, 0, 5],
        [0, 0, 16, 3, 0, 30],
        2 * group,
        2,
        64,
        16,
        dtype,
        width=3,
        pad=3,
        block_q=16 // group,
        block_k=16,
    )


def test_prefill_head_dim_128_page_256():
    _prefill_case([40, 1, 20], [230, 256, 0], 4, 2, 128, 256, jnp.bfloat16, width=2, pad=5, block_k=64)


def test_prefill_tiny_batch():
    # Fewer tokens than a block of rows: the entry pads the packed batch.
    _prefill_case([2], [0], 2, 1, 64, 16, jnp.float32, width=1)


def test_prefill_input_checks():
    cache = jnp.zeros((4, 2, 16, 64), jnp.bfloat16)
    q = jnp.zeros((5, 4, 64), jnp.bfloat16)
    tables, lens = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    cu = jnp.asarray([0, 2, 5], jnp.int32)
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_prefill_attention(q, cache, cache, tables, cu[:2], lens)
    with pytest.raises(ValueError, match="context_lens"):
        paged_prefill_attention(q, cache, cache, tables, cu, lens.astype(jnp.float32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_prefill_attention(q[:, :3], cache, cache, tables, cu, lens)
    with pytest.raises(ValueError, match="power-of-two q heads"):
        q6 = jnp.zeros((5, 6, 64), jnp.bfloat16)
        paged_prefill_attention(q6, cache, cache, tables, cu, lens, interpret=True)
    with pytest.raises(ValueError, match="tune the Triton kernel"):
        paged_prefill_attention(q, cache, cache, tables, cu, lens, backend="mosaic", block_k=16)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_decode_qwen_heads(dtype, head_dim):
    lens = [1, 255, 256, 257, 4096, 1000, 0, 3000] * 4
    _decode_case(lens, 16, 8, head_dim, 256, dtype, width=16)
    _decode_case(lens[:2] + [4096], 16, 8, head_dim, 256, dtype, width=16)  # batch 3: many splits


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_gpu_decode_gqa(group):
    _decode_case([1, 511, 512, 513, 2000, 0], 4 * group, 4, 128, 512, jnp.bfloat16, width=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("group,head_dim", [(1, 128), (2, 128), (4, 64), (8, 128)])
def test_gpu_prefill(dtype, group, head_dim):
    _prefill_case(
        [1, 255, 256, 257, 700, 0, 40],
        [0, 0, 256, 3, 100, 0, 1000],
        4 * group,
        4,
        head_dim,
        256,
        dtype,
        width=5,
        pad=9,
    )


@pytest.mark.gpu
def test_gpu_store_kv_qwen():
    rng = np.random.default_rng(2)
    shape = (64, 8, 256, 128)
    k_cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((512, 8, 128)), jnp.bfloat16)
    slots = rng.permutation(64 * 256)[:512].astype(np.int32)
    slots[::7] = -1
    want = store_kv_reference(k_cache, v_cache, k, -k, jnp.asarray(slots))
    got = store_kv(k_cache, v_cache, k, -k, jnp.asarray(slots))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.gpu
def test_gpu_cache_over_4gib():
    """Pages past 2**31 elements: the kernels' addresses must not wrap (the lowering switches to 64 bits)."""
    num_pages, k_cache, v_cache = _caches_over_4gib()
    k = jax.random.normal(jax.random.key(2), (300, 8, 128), jnp.bfloat16)
    slots = jnp.arange(300, dtype=jnp.int32) + (num_pages - 2) * 256  # the last two pages
    want_last = store_kv_reference(k_cache[-2:], v_cache[-2:], k, k, slots - (num_pages - 2) * 256)
    k_cache, v_cache = store_kv(k_cache, v_cache, k, k, slots)
    np.testing.assert_array_equal(np.asarray(k_cache[-2:]), np.asarray(want_last[0]))
    tables = jnp.asarray([[num_pages - 2, num_pages - 1], [num_pages - 1, 0]], jnp.int32)
    lens = jnp.asarray([300, 400], jnp.int32)
    q = jax.random.normal(jax.random.key(3), (2, 16, 128), jnp.bfloat16)
    small_k = k_cache[jnp.asarray([0, num_pages - 2, num_pages - 1])]
    small_v = v_cache[jnp.asarray([0, num_pages - 2, num_pages - 1])]
    small_tables = jnp.asarray([[1, 2], [2, 0]], jnp.int32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    ref = paged_decode_attention_reference(q, small_k, small_v, small_tables, lens)
    _assert_close(out, ref, jnp.bfloat16)
    cu = jnp.asarray([0, 300], jnp.int32)
    qp = jax.random.normal(jax.random.key(4), (300, 16, 128), jnp.bfloat16)
    out = paged_prefill_attention(qp, k_cache, v_cache, tables[:1], cu, lens[:1])
    ref = paged_prefill_attention_reference(qp, small_k, small_v, small_tables[:1], cu, lens[:1])
    _assert_close(out, ref, jnp.bfloat16)
