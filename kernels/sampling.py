"""The sampler's reduction: argmax over the vocabulary of logits plus hashed Gumbel noise (`gumbel_argmax`).

The Gumbel-max trick draws token i with probability softmax(x)_i as argmax_i(x_i + g_i), g_i standard
Gumbel noise. Here the noise is a counter-based hash of (seed, row, column) computed where it is used, so no
[B, V] random bits are ever written (`gumbel_noise`); the logits are scaled by 1 / temperature as they are
read, and rows flagged greedy take the plain argmax. The argmax returns the first maximum, or the first NaN
of a row that has one (`jnp.argmax`'s rule).

The kernel (Triton lowering of Pallas) reads each row in chunks of `block_v` columns, one program per (row,
chunk): it hashes the noise, adds it and reduces its chunk to (value, first index); XLA then picks each row's
winner among its chunks. The reference is the same math in jnp (two stages too: the vocabulary as up to 128
chunks, then their winners), what the CPU runs. The hash is exact integer arithmetic, so both draw the same
uniforms. On the GPU the kernel, bound by its arithmetic, turns them into noise with the approximate log2
instruction (`_noise_approx`, within about 2e-6 of the exact logs), so its tokens are the reference's except
where a row's two best values lie that close. In interpret mode it uses the exact logs and gives the
reference's tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MAX_CHUNKS = 128  # the reference's first stage splits each row into at most this many chunks
BLOCK_V = 4096  # the kernel's columns per program
_NO_INDEX = np.iinfo(np.int32).max


def _mix32(x):
    """A 32-bit integer mixer (C. Wellons' lowbias32): a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x735A2D97)
    return x ^ (x >> 15)


def _uniform(seed0, seed1, rows, cols, vocab):
    """The uniform w in (0, 1) of elements (rows, cols) (uint32 arrays that broadcast) of a [B, vocab] draw: the
    counter r * vocab + c (unique per element for B * vocab < 2^32) hashed by two rounds of `_mix32` keyed by
    the seed words. The 32 hash bits h give w = float32(h) / 2^32 + 2^-33, clamped to <= 1 - 2^-24, finest
    near w = 0, the upper tail of the noise that decides the argmax (finer there than `jax.random.gumbel`'s
    23-bit uniforms)."""
    h = _mix32(_mix32((rows * np.uint32(vocab) + cols) ^ seed0) ^ seed1)
    return jnp.minimum(h.astype(jnp.float32) * np.float32(2.0**-32) + np.float32(2.0**-33), np.float32(1 - 2.0**-24))


def _noise(w):
    """Gumbel noise -log(-log1p(-w)): finite, in [-2.8, 22.9]."""
    return -jnp.log(-jnp.log1p(-w))


def _lg2_approx(y):
    """log2(y) by the GPU's approximate instruction (relative error about 2^-22)."""
    [out] = plgpu.elementwise_inline_asm(
        "lg2.approx.f32 $0, $1;",
        args=[y],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct.like(y)],
    )
    return out


def _noise_approx(w):
    """`_noise` from two approximate log2s, a few times fewer instructions than the exact logs. -log1p(-w) is
    -log(1 - w) where 1 - w loses little (w >= 2^-6), else its series to w^4 (truncation below 2^-24
    relative): the noise differs from `_noise` by about 1e-6."""
    ln2 = np.float32(np.log(2.0))
    series = w * (1 + w * (np.float32(1 / 2) + w * (np.float32(1 / 3) + w * np.float32(1 / 4))))
    e = jnp.where(w < np.float32(2.0**-6), series, -ln2 * _lg2_approx(1 - w))  # -log1p(-w) > 0
    return -ln2 * _lg2_approx(e)


def gumbel_noise(seed, shape):
    """Standard Gumbel noise [B, V] float32 for `seed` (two uint32 words), elementwise from (seed, row, column)."""
    rows, cols = shape
    r = lax.broadcasted_iota(jnp.uint32, shape, 0)
    c = lax.broadcasted_iota(jnp.uint32, shape, 1)
    return _noise(_uniform(seed[0], seed[1], r, c, cols))


def _pick(a, b):
    """Argmax reducer on (value, index) pairs: the larger value, NaN above everything, ties (NaN ties
    included) to the lower index; commutative and associative, so the reduction order does not matter."""
    (av, ai), (bv, bi) = a, b
    a_nan, b_nan = av != av, bv != bv
    a_wins = (av > bv) | (a_nan & ~b_nan) | (((av == bv) | (a_nan & b_nan)) & (ai < bi))
    return lax.select(a_wins, av, bv), lax.select(a_wins, ai, bi)


def _argmax_pairs(values, indices, axis):
    init = (np.array(-np.inf, np.float32), np.array(_NO_INDEX, np.int32))
    return lax.reduce((values, indices), init, _pick, (axis,))


def argmax(x):
    """x [B, V] float32 -> int32 [B]: the index of each row's maximum, the first on ties, the first NaN if
    the row has one: `jnp.argmax(x, -1)` (whose reducer leaves the pick among several NaNs to XLA's reduction
    order; on CPU it is the first too).
    Two stages: the row as C chunks (C the largest power of two <= 128 dividing V; C = 1 works too), each
    chunk's (max, global index), then the argmax over the C chunk winners."""
    rows, vocab = x.shape
    chunks = _MAX_CHUNKS
    while vocab % chunks:
        chunks //= 2
    index = lax.broadcasted_iota(jnp.int32, (rows, vocab), 1).reshape(rows, chunks, vocab // chunks)
    values, index = _argmax_pairs(x.reshape(rows, chunks, vocab // chunks), index, 2)  # [B, C] x2
    return _argmax_pairs(values, index, 1)[1]


def gumbel_argmax_reference(x, scale, greedy, seed):
    """x [B, V] float32 logits; scale [B] float32 (1 / temperature); greedy [B] bool; seed [2] uint32 ->
    int32 [B]: argmax(x * scale) on greedy rows, a draw from softmax(x * scale) on the others
    (argmax(x * scale + `gumbel_noise`)), in one argmax."""
    x = x * scale[:, None]
    return argmax(jnp.where(greedy[:, None], x, x + gumbel_noise(seed, x.shape)))


def _gumbel_argmax_kernel(seed_ref, scale_ref, greedy_ref, x_ref, value_ref, index_ref, *, block_v: int, exact: bool):
    # seed [2] uint32, scale [B] float32, greedy [B] int32, x [B, V] float32, all whole; value, index [B, C]:
    # this program's (row, chunk) winner. Columns past V load -inf and never win (a real column ties them at a
    # lower index).
    row, chunk = pl.program_id(0), pl.program_id(1)
    vocab = x_ref.shape[1]
    cols = chunk * block_v + lax.broadcasted_iota(jnp.int32, (block_v,), 0)
    valid = cols < vocab
    x = plgpu.load(x_ref.at[row, cols], mask=valid, other=-jnp.inf) * scale_ref[row]
    w = _uniform(seed_ref[0], seed_ref[1], row.astype(jnp.uint32), cols.astype(jnp.uint32), vocab)
    noise = _noise(w) if exact else _noise_approx(w)
    x = jnp.where(greedy_ref[row] != 0, x, x + noise)
    nan = x != x
    best = jnp.max(jnp.where(nan, -jnp.inf, x))
    first_max = jnp.min(jnp.where(x == best, cols, _NO_INDEX))
    first_nan = jnp.min(jnp.where(nan, cols, _NO_INDEX))
    has_nan = first_nan != _NO_INDEX
    value_ref[row, chunk] = jnp.where(has_nan, jnp.float32(jnp.nan), best)
    index_ref[row, chunk] = jnp.where(has_nan, first_nan, first_max)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret", "exact"))
def _gumbel_argmax_pallas(x, scale, greedy, seed, *, block_v, num_warps, interpret, exact):
    rows, vocab = x.shape
    chunks = pl.cdiv(vocab, block_v)
    values, indices = pl.pallas_call(
        functools.partial(_gumbel_argmax_kernel, block_v=block_v, exact=exact),
        grid=(rows, chunks),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct((rows, chunks), jnp.float32), jax.ShapeDtypeStruct((rows, chunks), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gumbel_argmax",
    )(seed, scale, greedy.astype(jnp.int32), x)
    return _argmax_pairs(values, indices, 1)[1]


def gumbel_argmax(x, scale, greedy, seed, *, interpret=False, block_v=BLOCK_V, num_warps=4, exact_noise=None):
    """Public entry; same contract as `gumbel_argmax_reference`. The CPU runs the reference unless
    `interpret` (the kernel in interpret mode, for tests). `block_v` (a power of two) columns per program.
    `exact_noise`: the reference's exact logs (default in interpret mode, which cannot run the GPU's
    approximate log2) rather than `_noise_approx` (the default on the GPU)."""
    if x.ndim != 2 or x.dtype != jnp.float32:
        raise ValueError(f"x must be float32 [B, V], got {x.dtype} {x.shape}")
    for name, a, dtype in (("scale", scale, jnp.float32), ("greedy", greedy, jnp.bool_)):
        if a.shape != x.shape[:1] or a.dtype != dtype:
            raise ValueError(f"{name} must be {jnp.dtype(dtype).name} [{x.shape[0]}], got {a.dtype} {a.shape}")
    if seed.shape != (2,) or seed.dtype != jnp.uint32:
        raise ValueError(f"seed must be uint32 [2], got {seed.dtype} {seed.shape}")
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if x.shape[0] * x.shape[1] >= 2**32:
        raise ValueError(f"{x.shape[0]} rows of {x.shape[1]} columns overflow the noise's 32-bit counter")
    if jax.default_backend() == "cpu" and not interpret:
        return gumbel_argmax_reference(x, scale, greedy, seed)
    exact = interpret if exact_noise is None else bool(exact_noise)
    return _gumbel_argmax_pallas(
        x, scale, greedy, seed, block_v=block_v, num_warps=num_warps, interpret=interpret, exact=exact
    )
