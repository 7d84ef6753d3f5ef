"""The fp8 KV cache: layout contract, quantization, and the kernels on fp8 pages against their references.

CPU: the Triton-lowered kernels run in interpret mode on tiny shapes; `gpu` tests run them compiled on
Qwen3-0.6B heads, once per way of decoding the e4m3 bytes in registers. Unowned slots hold NaN bytes
(0x7F) and NaN scales, pages are permuted, and the stored bytes and scales are compared bit-exactly.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from nanovllm_jax.kernels import (
    KV_CACHE_DTYPES,
    kv_cache_bytes,
    kv_cache_shapes,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    store_kv_fp8,
    store_kv_fp8_reference,
)
from nanovllm_jax.kernels.kv_layout import dequantize_fp8, quantize_fp8
from nanovllm_jax.kernels.paged_attention import FP8_UNIT, decode_e4m3

from nanovllm_jax.layers.attention import AttentionMetadata, paged_attention

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# Kernel vs reference on the same fp8 pages. float32 q: TF32 dots; rows of scales 0.1-10 (measured 2.3e-3
# on the H200, above the bf16-cache tests' 2e-3).
TOL = {jnp.float32: 4e-3, jnp.bfloat16: 2e-2}
NAN_BYTE = 0x7F  # float8_e4m3fn NaN
FP8_DECODES = ["int", "native", "f16"]  # the kernels' `fp8_decode` modes


def _fp8_cache(rng, num_pages, kv_heads, block_size, head_dim, tables, context_lens, v_rows=(0.1, 10)):
    """Random fp8 caches (bytes and scales); every slot outside the contexts holds NaN bytes and scales.

    Rows have magnitudes drawn uniformly from (0.1, 10), value rows from `v_rows`.
    """
    shape = (num_pages, kv_heads, block_size, head_dim)
    owned = np.zeros((num_pages, block_size), bool)
    for table, length in zip(tables, context_lens, strict=True):
        for t in range(length):
            owned[table[t // block_size], t % block_size] = True
    out = []
    for rows in ((0.1, 10), v_rows):
        x = rng.standard_normal(shape) * rng.uniform(*rows, shape[:3] + (1,))  # rows of varied magnitude
        data, scale = (np.array(a) for a in quantize_fp8(jnp.asarray(x, jnp.float32)))
        data.transpose(0, 2, 1, 3)[~owned] = NAN_BYTE
        scale.transpose(0, 2, 1)[~owned] = np.nan
        out.append((data, scale))
    (k, ks), (v, vs) = out
    return tuple(jnp.asarray(a) for a in (k, v, ks, vs))


def _tables(rng, batch, width, num_pages):
    return rng.permutation(num_pages)[: batch * width].reshape(batch, width).astype(np.int32)


def _assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any(), "NaN in the kernel output"
    assert not np.isnan(ref).any()
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < TOL[dtype], f"relative error {err:.2e}"


# ------------------------------------------------------------------------------------ layout, quantization


def test_kv_cache_shapes_contract():
    auto = kv_cache_shapes(10, 8, 256, 128, jnp.bfloat16, "auto")
    assert auto == (jax.ShapeDtypeStruct((10, 8, 256, 128), jnp.bfloat16),) * 2
    fp8 = kv_cache_shapes(10, 8, 256, 128, jnp.bfloat16, "fp8")
    assert [(s.shape, s.dtype) for s in fp8] == [
        ((10, 8, 256, 128), jnp.uint8),
        ((10, 8, 256, 128), jnp.uint8),
        ((10, 8, 256), jnp.float32),
        ((10, 8, 256), jnp.float32),
    ]
    assert all(s.shape[1] == 8 for s in auto + fp8)  # the kv-head axis: every array shards P(None, tp)
    assert kv_cache_bytes(auto) == 2 * 10 * 8 * 256 * 128 * 2
    assert kv_cache_bytes(fp8) == 2 * 10 * 8 * 256 * (128 + 4)
    assert KV_CACHE_DTYPES == ("auto", "fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_shapes(10, 8, 256, 128, jnp.bfloat16, "int8")


def test_quantize_matches_ml_dtypes_and_error_bound():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 128)) * np.exp(rng.uniform(-8, 8, (64, 3, 1)))
    x[0, 0] = 0.0  # a zero row: scale 0, bytes 0
    x[1, 0, :] = 1e-3
    x[1, 0, 0] = 50.0  # one outlier: most of the row falls in e4m3's subnormals
    data, scale = quantize_fp8(jnp.asarray(x, jnp.float32))
    assert data.dtype == jnp.uint8 and scale.dtype == jnp.float32
    x32 = x.astype(np.float32)
    amax = np.abs(x32).max(-1)
    np.testing.assert_allclose(np.asarray(scale), amax / np.float32(448), rtol=2e-7)  # XLA may use 1/448
    inv = np.where(amax > 0, np.float32(448) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    want = (x32 * inv[..., None]).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    # Round to nearest even, as ml_dtypes does; a last-bit difference in the float32 scale may move a tie.
    diff = np.abs(np.asarray(data).astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    assert (np.asarray(data)[0, 0] == 0).all() and np.asarray(scale)[0, 0] == 0
    # e4m3 rounds to 3 mantissa bits: relative error <= 2**-4 for normals, absolute <= 2**-10 * scale below.
    err = np.abs(np.asarray(dequantize_fp8(data, scale)) - x32)
    bound = np.maximum(np.abs(x32) * 2.0**-4, np.asarray(scale)[..., None] * 2.0**-10) * (1 + 1e-5)
    assert (err <= bound).all()
    assert not np.isnan(np.asarray(dequantize_fp8(data, scale))).any()  # |x / scale| <= 448: never NaN


@pytest.mark.parametrize("how", FP8_DECODES)
def test_decode_e4m3_all_bytes(how):
    b = jnp.arange(256, dtype=jnp.uint8)
    want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(decode_e4m3(b, jnp.float32, how)) * FP8_UNIT[how]
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])


# ------------------------------------------------------------------------------------------------ store


def _store_case(num_pages, kv_heads, block_size, head_dim, tokens, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = kv_cache_shapes(num_pages, kv_heads, block_size, head_dim, dtype, "fp8")
    before = [rng.integers(0, 256, s.shape).astype(np.uint8) for s in shapes[:2]]
    before += [rng.standard_normal(s.shape).astype(np.float32) for s in shapes[2:]]
    k = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)) * 3, dtype)
    v = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    slots = rng.permutation(num_pages * block_size)[:tokens].astype(np.int32)
    slots[::5] = -1  # padding tokens: skipped
    slots[1] = num_pages * block_size - 1  # the very last slot
    want = store_kv_fp8_reference(*[jnp.asarray(a) for a in before], k, v, jnp.asarray(slots))
    got = store_kv_fp8(*[jnp.asarray(a) for a in before], k, v, jnp.asarray(slots), interpret=INTERPRET)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # Untouched slots keep their bytes; written ones hold the quantized rows and their scales.
    live = slots >= 0
    page, off = slots[live] // block_size, slots[live] % block_size
    k8, ks = quantize_fp8(k)
    np.testing.assert_array_equal(np.asarray(got[0])[page, :, off], np.asarray(k8)[live])
    np.testing.assert_array_equal(np.asarray(got[2])[page, :, off], np.asarray(ks)[live])
    written = np.zeros((num_pages, block_size), bool)
    written[page, off] = True
    np.testing.assert_array_equal(
        np.asarray(got[1]).transpose(0, 2, 1, 3)[~written], before[1].transpose(0, 2, 1, 3)[~written]
    )
    np.testing.assert_array_equal(
        np.asarray(got[3]).transpose(0, 2, 1)[~written], before[3].transpose(0, 2, 1)[~written]
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_store_kv_fp8_bit_exact(dtype):
    _store_case(5, 2, 16, 64, 12, dtype)


def test_store_kv_fp8_under_outer_jit_donated():
    rng = np.random.default_rng(1)
    shapes = kv_cache_shapes(3, 2, 16, 64, jnp.bfloat16, "fp8")
    cache = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    k = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.bfloat16)
    slots = jnp.asarray([3, -1, 47, 16], jnp.int32)
    want = store_kv_fp8_reference(*[jnp.zeros(s.shape, s.dtype) for s in shapes], k, -k, slots)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(cache, k, slots):
        return store_kv_fp8(*cache, k, -k, slots, interpret=INTERPRET)

    for g, w in zip(step(cache, k, slots), want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_store_kv_fp8_input_checks():
    k8 = jnp.zeros((2, 2, 16, 64), jnp.uint8)
    sc = jnp.zeros((2, 2, 16), jnp.float32)
    k = jnp.zeros((3, 2, 64), jnp.bfloat16)
    slots = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="uint8"):
        store_kv_fp8(k8.astype(jnp.bfloat16), k8, sc, sc, k, k, slots)
    with pytest.raises(ValueError, match="k_scale"):
        store_kv_fp8(k8, k8, sc[..., :8], sc, k, k, slots)
    with pytest.raises(ValueError, match="tokens, kv_heads, head_dim"):
        store_kv_fp8(k8, k8, sc, sc, k[:, :1], k[:, :1], slots)


# ----------------------------------------------------------------------------------------------- attention


def _decode_case(
    context_lens, q_heads, kv_heads, head_dim, block_size, dtype, width, seed=0, v_rows=(0.1, 10), zero_v=0, **kw
):
    """Kernel vs reference; `zero_v` zeroes the values of sequence 0's first keys (scale 0: a zero block)."""
    rng = np.random.default_rng(seed)
    batch = len(context_lens)
    num_pages = batch * width + 2
    tables = _tables(rng, batch, width, num_pages)
    k, v, ks, vs = _fp8_cache(rng, num_pages, kv_heads, block_size, head_dim, tables, context_lens, v_rows)
    if zero_v:
        v, vs = v.at[tables[0, 0], :, :zero_v].set(0), vs.at[tables[0, 0], :, :zero_v].set(0.0)
    q = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), dtype)
    args = (q, k, v, jnp.asarray(tables), jnp.asarray(context_lens, jnp.int32))
    out = paged_decode_attention(*args, k_scale=ks, v_scale=vs, interpret=INTERPRET, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = paged_decode_attention_reference(*args, k_scale=ks, v_scale=vs)
    _assert_close(out, ref, dtype)
    for b, length in enumerate(context_lens):
        if length == 0:
            np.testing.assert_array_equal(np.asarray(out[b], np.float32), 0.0)
    return q, (k, v, ks, vs), args, ref


def test_decode_fp8_reference_is_dequantized_attention():
    """The fp8 reference equals the float32 reference on the dequantized pages (NaN slots zeroed)."""
    q, (k, v, ks, vs), args, ref = _decode_case([1, 31, 32, 33, 0], 4, 2, 64, 32, jnp.float32, width=2, block_k=16)
    kd = jnp.nan_to_num(dequantize_fp8(k, ks))
    vd = jnp.nan_to_num(dequantize_fp8(v, vs))
    want = paged_decode_attention_reference(q, kd, vd, *args[3:])
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("how", FP8_DECODES)
def test_decode_fp8(group, how):
    # Page 32, blocks of 16 keys: lengths 1, P-1, P, P+1, long, and a padded row.
    _decode_case(
        [1, 31, 32, 33, 100, 0], 2 * group, 2, 64, 32, jnp.bfloat16, width=4, block_k=16, num_splits=1, fp8_decode=how
    )


@pytest.mark.parametrize("how", FP8_DECODES)
def test_decode_fp8_splits_float32_q(how):
    _decode_case([1, 33, 127, 0], 4, 2, 64, 32, jnp.float32, width=4, block_k=16, num_splits=4, fp8_decode=how)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("how", FP8_DECODES)
def test_decode_fp8_tiny_value_scales(how, num_splits):
    """Value scales of about 5e-10..6e-8 (rows of 1e-7..1e-5) and one all-zero key block: p * scale lies
    in float16's subnormals or under them, so "f16" passes only with its per-block normalization."""
    _decode_case(
        [33, 1, 31, 100, 0],
        8,
        2,
        64,
        32,
        jnp.bfloat16,
        width=4,
        v_rows=(1e-7, 1e-5),
        zero_v=16,
        block_k=16,
        num_splits=num_splits,
        fp8_decode=how,
    )


def test_decode_fp8_rejects_unknown_decode():
    k8 = jnp.zeros((4, 2, 16, 64), jnp.uint8)
    sc = jnp.zeros((4, 2, 16), jnp.float32)
    q, tables, lens = jnp.zeros((2, 4, 64), jnp.bfloat16), jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="fp8_decode"):
        paged_decode_attention(q, k8, k8, tables, lens, k_scale=sc, v_scale=sc, fp8_decode="e5m2")


def _prefill_case(q_lens, prefix_lens, q_heads, kv_heads, head_dim, block_size, dtype, width, pad=0, seed=0, **kw):
    rng = np.random.default_rng(seed)
    batch = len(q_lens)
    context_lens = [a + b for a, b in zip(q_lens, prefix_lens, strict=True)]
    num_pages = batch * width + 2
    tables = _tables(rng, batch, width, num_pages)
    k, v, ks, vs = _fp8_cache(rng, num_pages, kv_heads, block_size, head_dim, tables, context_lens)
    tokens = sum(q_lens) + pad
    q = jnp.asarray(rng.standard_normal((tokens, q_heads, head_dim)), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    args = (q, k, v, jnp.asarray(tables), cu, jnp.asarray(context_lens, jnp.int32))
    out = paged_prefill_attention(*args, k_scale=ks, v_scale=vs, interpret=INTERPRET, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, paged_prefill_attention_reference(*args, k_scale=ks, v_scale=vs), dtype)
    if pad:
        np.testing.assert_array_equal(np.asarray(out[sum(q_lens) :], np.float32), 0.0)


@pytest.mark.parametrize("group,dtype", [(1, jnp.bfloat16), (4, jnp.float32)])
def test_prefill_fp8(group, dtype):
    # Prompts of 1, P-1, P+1 new tokens, cached prefixes, a padded sequence, padded rows at the end.
    _prefill_case(
        [1, 15, 17, 0, 5],
        [0, 0, 3, 0, 30],
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


def test_prefill_fp8_rejects_mosaic():
    k8 = jnp.zeros((4, 2, 16, 64), jnp.uint8)
    sc = jnp.zeros((4, 2, 16), jnp.float32)
    q = jnp.zeros((5, 4, 64), jnp.bfloat16)
    tables, lens, cu = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32), jnp.asarray([0, 2, 5], jnp.int32)
    with pytest.raises(ValueError, match="Mosaic"):
        paged_prefill_attention(q, k8, k8, tables, cu, lens, k_scale=sc, v_scale=sc, backend="mosaic")
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        paged_prefill_attention(q, k8, k8, tables, cu, lens, k_scale=sc)


def test_layer_paged_attention_fp8_tuple():
    """The model's seam: a 4-array cache tuple stores fp8 and attends; 'auto' and 'reference' agree."""
    rng = np.random.default_rng(3)
    shapes = kv_cache_shapes(4, 2, 16, 64, jnp.bfloat16, "fp8")
    q = jnp.asarray(rng.standard_normal((5, 4, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((5, 2, 64)), jnp.bfloat16)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray([16, 17, 18, 48, -1], jnp.int32),
        block_tables=jnp.asarray([[1, 0], [3, 2]], jnp.int32),
        context_lens=jnp.asarray([3, 1], jnp.int32),
        cu_q_lens=jnp.asarray([0, 3, 4], jnp.int32),
        is_prefill=True,
    )
    outs = []
    for impl in ("auto", "reference"):
        cache = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
        out, cache = paged_attention(q, k, -k, cache, md, impl)
        assert len(cache) == 4 and [c.dtype for c in cache] == [s.dtype for s in shapes]
        outs.append((out, cache))
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(outs[0][0], np.float32)).all()


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("how", FP8_DECODES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_decode_fp8_qwen_heads(how, dtype):
    lens = [1, 255, 256, 257, 4096, 1000, 0, 3000] * 4
    _decode_case(lens, 16, 8, 128, 256, dtype, width=16, fp8_decode=how)
    _decode_case(lens[:2] + [4096], 16, 8, 128, 256, dtype, width=16, fp8_decode=how)  # many splits
    tiny = dict(v_rows=(1e-7, 1e-5), zero_v=64, fp8_decode=how)  # value scales in float16's subnormals
    _decode_case(lens, 16, 8, 128, 256, dtype, width=16, **tiny)
    _decode_case(lens[:2] + [4096], 16, 8, 128, 256, dtype, width=16, **tiny)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 160])
def test_gpu_decode_fp8_large_batch(rows):
    """One split each, the batch sizes where the SMs hold several programs: 64 rows of 8 kv heads need a
    fourth program on an SM (64-key tiles), 160 more (128-key tiles)."""
    _decode_case(([1, 255, 256, 257, 2048, 1000, 0, 1500] * 20)[:rows], 16, 8, 128, 256, jnp.bfloat16, width=8)


@pytest.mark.gpu
@pytest.mark.parametrize("how", FP8_DECODES)
@pytest.mark.parametrize("group,head_dim", [(2, 128), (4, 64), (8, 128)])
def test_gpu_prefill_fp8(how, group, head_dim):
    _prefill_case(
        [1, 255, 256, 257, 700, 0, 40],
        [0, 0, 256, 3, 100, 0, 1000],
        4 * group,
        4,
        head_dim,
        256,
        jnp.bfloat16,
        width=5,
        pad=9,
        fp8_decode=how,
    )


@pytest.mark.gpu
def test_gpu_store_kv_fp8_qwen():
    _store_case(64, 8, 256, 128, 512, jnp.bfloat16, seed=2)
