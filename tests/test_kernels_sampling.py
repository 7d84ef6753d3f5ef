"""The sampler's Gumbel-max argmax kernel (`kernels.gumbel_argmax`) against its jnp reference.

CPU: the Triton-lowered kernel in interpret mode, tokens equal to the reference's on rows that stress the
argmax (ties inside and across the kernel's chunks, -inf, +inf, NaN, +-0), greedy and sampled rows mixed,
vocabularies that the chunks do not divide. GPU: the compiled kernel at Qwen3's vocabulary and the engine's
batch sizes, against the reference compiled by XLA. The sampler's own statistics (the draws follow softmax)
are tested on the reference in test_sampler.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import gumbel_argmax, gumbel_argmax_reference, sampling
from nanovllm_jax.kernels.sampling import gumbel_noise
from test_sampler import _hard_rows

ON_GPU = jax.default_backend() == "gpu"
SEED = jnp.array([0x12345678, 0x9ABCDEF0], jnp.uint32)


def _case(v, seed):
    rows = _hard_rows(v, np.random.default_rng(seed))
    b = rows.shape[0]
    greedy = np.arange(b) % 3 == 0  # every third row greedy, the others sampled
    scale = np.where(greedy, 1.0, np.linspace(0.5, 2.0, b)).astype(np.float32)
    return jnp.asarray(rows), jnp.asarray(scale), jnp.asarray(greedy)


@pytest.mark.parametrize("v,block_v", [(7, 4), (640, 64), (1000, 128), (5000, 1024)])
def test_kernel_matches_reference(v, block_v):
    """Interpret mode; the last chunk is partly past the vocabulary except at (640, 64)."""
    x, scale, greedy = _case(v, v)
    want = np.asarray(jax.jit(gumbel_argmax_reference)(x, scale, greedy, SEED))
    got = np.asarray(gumbel_argmax(x, scale, greedy, SEED, interpret=True, block_v=block_v))
    np.testing.assert_array_equal(got, want)
    # Greedy rows are the plain argmax (numpy: the first maximum, or the first NaN).
    g = np.asarray(greedy)
    np.testing.assert_array_equal(got[g], np.argmax(np.asarray(x)[g], -1))


def test_kernel_draws_with_the_noise_of_its_seed():
    """Sampled rows pick argmax(x * scale + noise) with the reference's noise; another seed, other tokens."""
    v = 3000
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, v)), jnp.float32)
    scale, greedy = jnp.full((8,), 1.25, jnp.float32), jnp.zeros((8,), bool)
    got = np.asarray(gumbel_argmax(x, scale, greedy, SEED, interpret=True, block_v=512))
    want = np.argmax(np.asarray(x * 1.25 + gumbel_noise(SEED, x.shape)), -1)
    np.testing.assert_array_equal(got, want)
    other = np.asarray(gumbel_argmax(x, scale, greedy, SEED + 1, interpret=True, block_v=512))
    assert (other != got).sum() >= 6  # 8 draws from near-flat rows of 3000 tokens


def test_input_checks():
    x, scale, greedy = jnp.zeros((2, 8), jnp.float32), jnp.ones((2,), jnp.float32), jnp.zeros((2,), bool)
    with pytest.raises(ValueError, match="x must be float32"):
        gumbel_argmax(x.astype(jnp.bfloat16), scale, greedy, SEED)
    with pytest.raises(ValueError, match="scale must be float32"):
        gumbel_argmax(x, scale[:1], greedy, SEED)
    with pytest.raises(ValueError, match="greedy must be bool"):
        gumbel_argmax(x, scale, greedy.astype(jnp.int32), SEED)
    with pytest.raises(ValueError, match="seed must be uint32"):
        gumbel_argmax(x, scale, greedy, SEED.astype(jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        gumbel_argmax(x, scale, greedy, SEED, block_v=100)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 256])
def test_gpu_qwen3_vocabulary(rows):
    """Compiled kernel vs XLA's reference at V = 151936. The kernel's float ops are the reference's, so the
    tokens are expected equal; a row may only differ where its two best values lie within float32 rounding."""
    v = 151936
    x = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, v)) * 3, jnp.float32)
    greedy = jnp.asarray(np.arange(rows) % 4 == 0)
    scale = jnp.where(greedy, 1.0, 1 / 0.6).astype(jnp.float32)
    got = np.asarray(jax.jit(gumbel_argmax)(x, scale, greedy, SEED))
    want = np.asarray(jax.jit(gumbel_argmax_reference)(x, scale, greedy, SEED))
    vals = np.asarray(jnp.where(greedy[:, None], x * scale[:, None], x * scale[:, None] + gumbel_noise(SEED, x.shape)))
    top2 = np.sort(vals, -1)[:, -2:]
    close = (top2[:, 1] - top2[:, 0]) <= 1e-5 * np.abs(top2[:, 1])
    assert (got == want)[~close].all(), np.flatnonzero((got != want) & ~close)
    np.testing.assert_array_equal(got[np.asarray(greedy)], np.argmax(np.asarray(x)[np.asarray(greedy)], -1))


def test_approximate_noise_formula(monkeypatch):
    """The GPU's noise formula (`_noise_approx`: log1p by its series below 2^-6) with exact log2s in place of
    the GPU instruction, against the exact noise, over uniforms from 2^-33 to 1 - 2^-24."""
    monkeypatch.setattr(sampling, "_lg2_approx", jnp.log2)
    w = np.concatenate([2.0 ** -np.linspace(1, 33, 4000), 1 - 2.0 ** -np.linspace(1, 24, 2000)]).astype(np.float32)
    exact = np.asarray(sampling._noise(jnp.asarray(w)), np.float64)
    approx = np.asarray(sampling._noise_approx(jnp.asarray(w)), np.float64)
    np.testing.assert_allclose(approx, exact, rtol=0, atol=2e-6)


def test_gpu_lowering_of_the_approximate_noise():
    """The kernel with the approximate noise lowers for CUDA (Triton), here on any machine."""
    x, scale, greedy = jnp.zeros((16, 1000), jnp.float32), jnp.ones((16,), jnp.float32), jnp.zeros((16,), bool)
    fn = functools.partial(sampling._gumbel_argmax_pallas, block_v=256, num_warps=4, interpret=False, exact=False)
    text = jax.jit(fn).trace(x, scale, greedy, SEED).lower(lowering_platforms=("cuda",)).as_text()
    assert "gumbel_argmax" in text
