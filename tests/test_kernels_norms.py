"""The fused residual add + RMSNorm kernel against its jnp reference.

CPU: the Triton-lowered kernel in interpret mode on tiny rows, hidden sizes a power of two or not (96:
padded to 128 with masked loads and stores). Both sides are compared as the model runs them, under jit:
there XLA keeps the bf16 sum in float32 for the norm (excess precision) in the kernel and the reference
alike, and bf16 outputs match bit for bit; float32 sums may differ in the order of the reduction (a
tight tolerance). The new residual is compared bit-exactly everywhere. GPU: the compiled kernel at the
Qwen3 sizes (D = 1024 and 5120, which is not a power of two), decode and prefill row counts. The
Mosaic GPU backend runs on the CPU in JAX's Mosaic GPU interpreter, and compiled on the GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from nanovllm_jax.kernels import norms as kernel_module

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
EPS = 1e-6


@functools.partial(jax.jit, static_argnames="eps")
def _reference(x, residual, weight, eps):
    if residual is None:
        return rms_norm_reference(x, weight, eps), None
    return add_rms_norm_reference(x, residual, weight, eps)


def _inputs(shape, dtype, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * scale, dtype)
    residual = jnp.asarray(rng.standard_normal(shape), dtype)
    weight = jnp.asarray(1 + 0.5 * rng.standard_normal(shape[-1]), dtype)
    return x, residual, weight


def _assert_normed(out, ref, exact):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # Not bit-exact: float32 (the order of the sum of squares); on the GPU also rsqrt and bf16 (one step).
    tol = 2**-7 if out.dtype == jnp.bfloat16 else (1e-5 if ON_GPU else 1e-6)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if exact:
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


def _check(shape, dtype, eps=EPS, residual=True, seed=0, backend="triton"):
    x, res, weight = _inputs(shape, dtype, seed)
    res = res if residual else None
    kw = dict(backend=backend, interpret=INTERPRET)
    if residual:
        normed, new_res = add_rms_norm(x, res, weight, eps, **kw)
    else:
        normed, new_res = rms_norm(x, weight, eps, **kw), None
    want_normed, want_res = _reference(x, res, weight, eps)
    if residual:
        assert new_res.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(new_res, np.float32), np.asarray(x + res, np.float32))
        np.testing.assert_array_equal(np.asarray(new_res, np.float32), np.asarray(want_res, np.float32))
    _assert_normed(normed, want_normed, exact=dtype == jnp.bfloat16 and not ON_GPU)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_add_rms_norm(dtype, dim):
    _check((17, dim), dtype)


@pytest.mark.parametrize("rows", [1, 3])
def test_add_rms_norm_few_rows(rows):
    _check((rows, 96), jnp.bfloat16)


def test_add_rms_norm_leading_axes():
    _check((2, 3, 64), jnp.bfloat16)  # [..., D]: any leading axes, as rows


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_rms_norm_without_residual(dtype):
    _check((3, 96), dtype, residual=False)


def test_eps_matters():
    # Rows of small values, so that eps moves the result; the same kernel at another static eps.
    x, res, weight = _inputs((3, 64), jnp.float32, scale=1e-2)
    res = res * 1e-2
    outs = [add_rms_norm(x, res, weight, eps, interpret=INTERPRET)[0] for eps in (EPS, 1e-2)]
    assert not np.allclose(outs[0], outs[1])
    _check((3, 64), jnp.float32, eps=1e-2)


def test_nan_row_stays_in_its_row():
    x, res, weight = _inputs((5, 96), jnp.bfloat16)
    x = x.at[2, 7].set(jnp.nan)
    res = res.at[3].set(jnp.inf)
    normed, new_res = add_rms_norm(x, res, weight, EPS, interpret=INTERPRET)
    want_normed, want_res = _reference(x, res, weight, EPS)
    normed, new_res = np.asarray(normed, np.float32), np.asarray(new_res, np.float32)
    assert np.isnan(normed[2]).all() and np.isnan(normed[3]).all()  # inf / inf: NaN, as the reference
    assert np.isnan(new_res[2, 7]) and np.isinf(new_res[3]).all()
    ok = [0, 1, 4]
    np.testing.assert_array_equal(normed[ok], np.asarray(want_normed, np.float32)[ok])
    np.testing.assert_array_equal(new_res, np.asarray(want_res, np.float32))


@pytest.mark.parametrize("num_partials,dtype", [(1, jnp.bfloat16), (3, jnp.float32), (4, jnp.bfloat16)])
def test_partial_sums(num_partials, dtype):
    """x as split-K partial sums [S, R, D] (float32, or the model dtype): added in float32 and rounded
    before the residual add, as the reference does; the new residual bit-exact."""
    x, res, weight = _inputs((5, 96), jnp.bfloat16)
    parts = jnp.asarray(np.random.default_rng(1).standard_normal((num_partials, 5, 96)) * 2, dtype)
    if num_partials > 1:
        parts = parts.astype(jnp.float32)
    normed, new_res = add_rms_norm(parts, res, weight, EPS, interpret=INTERPRET)
    summed = jnp.sum(parts.astype(jnp.float32), axis=0).astype(jnp.bfloat16)
    want_normed, want_res = _reference(summed, res, weight, EPS)
    assert normed.shape == new_res.shape == res.shape
    np.testing.assert_array_equal(np.asarray(new_res, np.float32), np.asarray(want_res, np.float32))
    _assert_normed(normed, want_normed, exact=not ON_GPU)
    ref_normed, ref_res = _reference(parts, res, weight, EPS)  # the reference takes partials too
    np.testing.assert_array_equal(np.asarray(ref_res, np.float32), np.asarray(want_res, np.float32))


def test_partial_sums_checks():
    _, res, weight = _inputs((3, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="partial sums"):
        add_rms_norm(jnp.zeros((2, 3, 64), jnp.float32), res, weight, EPS)  # wrong row shape
    with pytest.raises(ValueError, match="partial sums"):
        add_rms_norm(jnp.zeros((2, 3, 128), jnp.float16), res, weight, EPS)  # neither float32 nor bf16
    with pytest.raises(ValueError, match="no partial sums"):
        add_rms_norm(jnp.zeros((2, 3, 128), jnp.float32), res, weight, EPS, backend="mosaic")


def test_no_rows():
    x, res, weight = _inputs((0, 64), jnp.bfloat16)
    normed, new_res = add_rms_norm(x, res, weight, EPS, interpret=INTERPRET)
    assert normed.shape == new_res.shape == (0, 64)


def test_input_checks():
    x, res, weight = _inputs((3, 64), jnp.bfloat16)
    bad = [
        (x, res[:2], weight),  # residual shape
        (x, res.astype(jnp.float32), weight),  # residual dtype
        (x, res, weight[:32]),  # weight shape
        (x, res, weight.astype(jnp.float32)),  # weight dtype
        (x.astype(jnp.float16), res.astype(jnp.float16), weight.astype(jnp.float16)),  # dtype
        (x[0, 0], res[0, 0], weight[:1].reshape(())),  # a scalar
    ]
    for args in bad:
        with pytest.raises(ValueError):
            add_rms_norm(*args, EPS, interpret=INTERPRET)
    with pytest.raises(ValueError):
        rms_norm(x, weight[None], EPS, interpret=INTERPRET)
    with pytest.raises(ValueError, match="backend"):
        add_rms_norm(x, res, weight, EPS, backend="cuda")
    x, res, weight = _inputs((3, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        add_rms_norm(x, res, weight, EPS, backend="mosaic")


# ------------------------------------------------------------------------- CPU: Mosaic GPU interpreter


@pytest.mark.parametrize("dtype,residual", [(jnp.bfloat16, True), (jnp.float32, True), (jnp.bfloat16, False)])
def test_mosaic_interpret(dtype, residual):
    if ON_GPU:
        pytest.skip("the GPU runs the compiled kernel")
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params", reason="no Mosaic GPU interpreter in this JAX")
    _check((3, 256), dtype, residual=residual, backend="mosaic")


@pytest.mark.parametrize("backend,dim", [("triton", 1024), ("triton", 5120), ("mosaic", 1024), ("mosaic", 5120)])
@pytest.mark.parametrize("residual", [True, False])
def test_lowers_for_the_gpu(backend, dim, residual):
    """Both kernels lower for CUDA on any machine (Triton IR and Mosaic GPU MLIR; compiled on the GPU)."""
    fn = kernel_module._norm_mgpu if backend == "mosaic" else kernel_module._norm_pallas
    x = jax.ShapeDtypeStruct((256, dim), jnp.bfloat16)
    fn.trace(x, x if residual else None, jax.ShapeDtypeStruct((dim,), jnp.bfloat16), eps=EPS).lower(
        lowering_platforms=("cuda",)
    )


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("dim", [1024, 5120])
@pytest.mark.parametrize("rows", [1, 256])
def test_gpu_add_rms_norm(backend, dtype, dim, rows):
    _check((rows, dim), dtype, seed=dim + rows, backend=backend)
    _check((rows, dim), dtype, residual=False, seed=dim + rows, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("num_partials", [1, 4, 8])
def test_gpu_partial_sums(num_partials):
    test_partial_sums(num_partials, jnp.bfloat16)
