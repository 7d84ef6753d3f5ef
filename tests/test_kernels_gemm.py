"""The decode GEMM kernel (`kernels.matmul`, `matmul_partials`) against XLA's dot.

CPU: the Triton-lowered kernel in interpret mode on small shapes: row counts that are multiples of 16,
one and several row tiles, split K; products compared in float32 (the kernel and XLA sum in different
orders). The shapes the kernel does not take run the reference. GPU: compiled, at the Qwen3-0.6B and 8B
projection shapes and the engine's decode buckets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import gemm as mm

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def _inputs(m, k, n, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    return x, w


def _exact(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def _assert_product(out, x, w):
    """out within the rounding of x's dtype of the float64 product."""
    want = _exact(x, w)
    tol = 2**-7 if x.dtype == jnp.bfloat16 else 2**-10
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m,k,n", [(16, 256, 128), (48, 384, 64), (128, 256, 256)])
def test_matmul(dtype, m, k, n):
    x, w = _inputs(m, k, n, dtype)
    out = mm.matmul(x, w, interpret=INTERPRET)
    assert out.shape == (m, n) and out.dtype == dtype
    _assert_product(out, x, w)


@pytest.mark.parametrize("split_k", [2, 4])
def test_partials_sum_to_the_product(split_k):
    m, k, n = 32, 1024, 128
    x, w = _inputs(m, k, n)
    tiling = mm.Tiling(block_m=16, block_n=64, block_k=128, split_k=split_k)
    parts = mm.matmul_partials(x, w, tiling=tiling, interpret=INTERPRET)
    assert parts.shape == (split_k, m, n) and parts.dtype == jnp.float32
    # Each partial is its own slice of K, exactly up to float32 rounding.
    ks = k // split_k
    for s in range(split_k):
        want = _exact(x[:, s * ks : (s + 1) * ks], w[s * ks : (s + 1) * ks])
        np.testing.assert_allclose(np.asarray(parts[s], np.float64), want, rtol=1e-4, atol=1e-4)
    total = mm.sum_partials(parts, jnp.bfloat16)
    assert total.dtype == jnp.bfloat16
    _assert_product(total, x, w)


def test_default_partials_split_until_the_grid_is_full():
    m, k, n = 16, 2048, 256  # 1 x 4 output tiles: split K 8 ways (the most) for 32 programs
    tiling = mm.default_tiling(m, k, n, mm.MAX_SPLIT_K)
    assert tiling.split_k == mm.MAX_SPLIT_K and tiling.fits(m, k, n)
    x, w = _inputs(m, k, n)
    parts = mm.matmul_partials(x, w, interpret=INTERPRET)
    assert parts.shape == (mm.MAX_SPLIT_K, m, n)
    _assert_product(mm.sum_partials(parts, jnp.float32), x, w)
    many = mm.default_tiling(256, 1024, 6144, mm.MAX_SPLIT_K)  # 4 x 48 tiles: enough programs unsplit
    assert many.split_k == 1 and many.programs(256, 6144) >= mm.MIN_PROGRAMS


def test_default_product_narrows_its_columns():
    """A product cannot split K: a grid short of programs takes 32-column tiles (Qwen3-0.6B's qkv at 16-64 rows)."""
    qkv = mm.default_tiling(64, 1024, 4096)
    assert (qkv.block_n, qkv.split_k) == (32, 1) and qkv.programs(64, 4096) >= mm.MIN_PROGRAMS
    assert mm.default_tiling(128, 1024, 4096).block_n == 64
    x, w = _inputs(16, 256, 512)
    assert mm.default_tiling(16, 256, 512).block_n == 32
    _assert_product(mm.matmul(x, w, interpret=INTERPRET), x, w)


def test_rows_are_independent():
    """A NaN row of x (a padded row of a bucket may hold anything) spoils only its own output row."""
    x, w = _inputs(32, 256, 128)
    x = x.at[5, 17].set(jnp.nan).at[20].set(jnp.inf)
    out = np.asarray(mm.matmul(x, w, interpret=INTERPRET), np.float32)
    assert np.isnan(out[5]).all() and not np.isfinite(out[20]).any()
    ok = [i for i in range(32) if i not in (5, 20)]
    _assert_product(out[ok], x[jnp.asarray(ok)], w)


@pytest.mark.parametrize(
    "m,k,n,dtype",
    [
        (5, 256, 128, jnp.bfloat16),
        (16, 256, 100, jnp.bfloat16),
        (16, 256, 128, jnp.float32),
        (1024, 256, 128, jnp.bfloat16),
    ],
)
def test_other_shapes_run_the_reference(m, k, n, dtype):
    """Rows not a multiple of 16 or above MAX_ROWS, columns the tiles do not divide, float32: XLA's dot."""
    x, w = _inputs(m, k, n, dtype)
    np.testing.assert_array_equal(np.asarray(mm.matmul(x, w, interpret=INTERPRET)), np.asarray(jnp.dot(x, w)))
    parts = mm.matmul_partials(x, w, interpret=INTERPRET)
    assert parts.shape == (1, m, n) and parts.dtype == dtype
    np.testing.assert_array_equal(np.asarray(parts[0]), np.asarray(jnp.dot(x, w)))


@pytest.mark.skipif(ON_GPU, reason="the CPU's fallback")
def test_cpu_runs_the_reference_even_with_a_tiling():
    x, w = _inputs(16, 256, 128)
    tiling = mm.Tiling(block_m=16, block_n=64, block_k=128, split_k=1)
    np.testing.assert_array_equal(np.asarray(mm.matmul(x, w, tiling=tiling)), np.asarray(jnp.dot(x, w)))
    np.testing.assert_array_equal(np.asarray(mm.matmul_partials(x, w, tiling=tiling)[0]), np.asarray(jnp.dot(x, w)))
    np.testing.assert_array_equal(
        np.asarray(mm.matmul_silu_mul(x, w, tiling=tiling)), np.asarray(mm.matmul_silu_mul_reference(x, w))
    )


def test_input_checks():
    x, w = _inputs(16, 256, 128)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        mm.matmul(x, w[:128])
    with pytest.raises(ValueError, match="one dtype"):
        mm.matmul(x, w.astype(jnp.float16))
    with pytest.raises(ValueError, match="does not tile"):
        mm.matmul(x, w, tiling=mm.Tiling(block_m=32, block_n=64, block_k=128, split_k=1))
    with pytest.raises(ValueError, match="split_k 1"):
        mm.matmul(x, w, tiling=mm.Tiling(block_m=16, block_n=64, block_k=128, split_k=2))


def test_lowers_for_the_gpu():
    """The kernel lowers to Triton IR for CUDA on any machine (compiled on the GPU)."""
    tiling = mm.default_tiling(64, 2048, 1024, mm.MAX_SPLIT_K)
    x, w = jax.ShapeDtypeStruct((64, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16)
    mm._matmul_pallas.trace(x, w, tiling=tiling).lower(lowering_platforms=("cuda",))


# ------------------------------------------------------------------------------------------------- GPU

QWEN3_SHAPES = [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024), (4096, 6144), (4096, 24576), (12288, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", QWEN3_SHAPES)
@pytest.mark.parametrize("m", [16, 64, 256, 512])
def test_gpu_decode_shapes(m, k, n):
    x, w = _inputs(m, k, n, seed=m + k + n)
    _assert_product(mm.matmul(x, w), x, w)
    _assert_product(mm.sum_partials(mm.matmul_partials(x, w), jnp.float32), x, w)


def _silu_mul_exact(x, w):
    gate_up = _exact(x, w)
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("m,k,inter", [(16, 256, 64), (64, 384, 128), (128, 256, 192), (256, 256, 128)])
def test_matmul_silu_mul(m, k, inter):
    """silu(x @ gate) * (x @ up) from one kernel: [gate | up] columns, half the columns out."""
    x, w = _inputs(m, k, 2 * inter)
    out = mm.matmul_silu_mul(x, w, interpret=INTERPRET)
    assert out.shape == (m, inter) and out.dtype == x.dtype
    want = _silu_mul_exact(x, w)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2**-7, atol=2**-7 * np.abs(want).max())
    ref = mm.matmul_silu_mul_reference(x, w)  # the model's op-by-op math: within bf16 rounding of the kernel
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=2**-6, atol=2**-6 * np.abs(want).max())


def test_matmul_silu_mul_fallback_and_checks():
    x, w = _inputs(5, 256, 128)  # 5 rows: the reference
    np.testing.assert_array_equal(
        np.asarray(mm.matmul_silu_mul(x, w, interpret=INTERPRET)), np.asarray(mm.matmul_silu_mul_reference(x, w))
    )
    x, w = _inputs(16, 256, 128)
    with pytest.raises(ValueError, match="even"):
        mm.matmul_silu_mul(x, w[:, :127])
    with pytest.raises(ValueError, match="gated product"):
        mm.matmul_silu_mul(x, w, tiling=mm.Tiling(block_m=16, block_n=64, block_k=128, split_k=2))
    out = mm.matmul_silu_mul(
        x, w, tiling=mm.Tiling(block_m=16, block_n=32, block_k=128, split_k=1), interpret=INTERPRET
    )
    np.testing.assert_allclose(np.asarray(out, np.float64), _silu_mul_exact(x, w), rtol=2**-7, atol=2**-7)


@pytest.mark.gpu
@pytest.mark.parametrize("k,inter", [(1024, 3072), (4096, 12288)])
@pytest.mark.parametrize("m", [16, 64, 256, 512])
def test_gpu_matmul_silu_mul(m, k, inter):
    x, w = _inputs(m, k, 2 * inter, seed=m + k)
    want = _silu_mul_exact(x, w)
    out = mm.matmul_silu_mul(x, w)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2**-7, atol=2**-7 * np.abs(want).max())
