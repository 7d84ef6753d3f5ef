"""On-device token sampler, called inside the engine's jitted step. Rows with temperature 0 take the argmax
of the logits; the others draw from softmax(logits / temperature) restricted first by top-k, then by top-p
(on the top-k-renormalised distribution), with the Gumbel-max trick. The Gumbel noise is a counter-based hash
of (key, row, column) computed elementwise, so XLA fuses it into the argmax and no [B, V] random bits are
written; greedy rows go through the same argmax without noise, and the argmax runs in two stages (chunks of
the vocabulary, then the chunk winners) so that a few long rows still spread over the GPU. Top-k keeps
exactly k tokens: ties at the k-th value go to the lower token index, as a stable sort orders them. Top-p
rule: sort descending and keep token i iff the probability mass of the tokens strictly before it is < p, i.e.
the smallest prefix whose mass is >= p (the top token is always kept). In exact arithmetic this is HF's
`TopPLogitsWarper` rule (remove a token if the ascending cumulative mass up to and including it is <= 1 - p),
except for which of several tied tokens survive at the boundary, and HF's `TopKLogitsWarper` keeps every token
tied with the k-th (so possibly more than k). `use_top_k_top_p` is static: when False no row uses top-k/top-p
and the sampler runs without any sort over the vocabulary. A row holding NaN returns its first NaN token
(with top-k/top-p: its first NaN or +inf token).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MAX_CHUNKS = 128  # stage one of the argmax splits each row into at most this many chunks


def _mix32(x):
    """A 32-bit integer mixer (C. Wellons' lowbias32): a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x735A2D97)
    return x ^ (x >> 15)


def gumbel_noise(key, shape):
    """Standard Gumbel noise [B, V] float32, elementwise from (key, row, column): two scalar words are drawn
    from `key`, then element (r, c) hashes the counter r * V + c (unique per element for B * V < 2^32) with
    two rounds of `_mix32` keyed by them. The 32 hash bits h give w = float32(h) / 2^32 + 2^-33, clamped to
    <= 1 - 2^-24, so 0 < w < 1, finest near w = 0, the upper tail of the noise that decides the argmax (finer
    there than `jax.random.gumbel`'s 23-bit uniforms); then noise = -log(-log1p(-w)), finite, in [-2.8, 22.9]."""
    rows, cols = shape
    seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = lax.broadcasted_iota(jnp.uint32, shape, 0) * np.uint32(cols) + lax.broadcasted_iota(jnp.uint32, shape, 1)
    h = _mix32(_mix32(counter ^ seed[0]) ^ seed[1])
    w = jnp.minimum(h.astype(jnp.float32) * np.float32(2.0**-32) + np.float32(2.0**-33), np.float32(1 - 2.0**-24))
    return -jnp.log(-jnp.log1p(-w))


def _pick(a, b):
    """Argmax reducer on (value, index) pairs: the larger value, NaN above everything, ties (NaN ties
    included) to the lower index; commutative and associative, so the reduction order does not matter."""
    (av, ai), (bv, bi) = a, b
    a_nan, b_nan = av != av, bv != bv
    a_wins = (av > bv) | (a_nan & ~b_nan) | (((av == bv) | (a_nan & b_nan)) & (ai < bi))
    return lax.select(a_wins, av, bv), lax.select(a_wins, ai, bi)


def _argmax_pairs(values, indices, axis):
    init = (np.array(-np.inf, np.float32), np.array(np.iinfo(np.int32).max, np.int32))
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


def _gumbel_argmax(x, greedy, key):
    """x [B, V] float32 (logits / temperature); greedy [B] bool -> [B]: argmax(x) on greedy rows, a draw
    from softmax(x) on the others (argmax(x + Gumbel noise)), in one argmax."""
    return argmax(jnp.where(greedy[:, None], x, x + gumbel_noise(key, x.shape)))


def sample(logits, temperatures, top_ks, top_ps, key, *, use_top_k_top_p: bool):
    """logits [B, V] any float; temperatures [B] f32 (0 = greedy); top_ks [B] i32 (-1 or >= V: off);
    top_ps [B] f32 (1.0: off); key: a PRNG key. Returns token ids [B] int32; same key -> same tokens."""
    logits = logits.astype(jnp.float32)  # [B, V]
    vocab = logits.shape[-1]
    greedy = temperatures <= 0  # [B]
    # Scale by 1 / temperature (a multiply per element, not a divide), finite even for a subnormal temperature.
    inv_temps = jnp.minimum(1.0 / jnp.where(greedy, 1.0, temperatures), jnp.finfo(jnp.float32).max).astype(jnp.float32)
    if not use_top_k_top_p:
        return _gumbel_argmax(logits * inv_temps[:, None], greedy, key).astype(jnp.int32)
    scaled = logits * inv_temps[:, None]  # [B, V]; greedy rows: the logits themselves
    # One stable ascending sort of the negated logits = descending order, ties by lower index. Map -0.0 to
    # +0.0 first so zeros tie (the sort orders -0.0 before +0.0), and NaN to the top (as argmax does).
    neg = jnp.where(scaled != scaled, -jnp.inf, -jnp.where(scaled == 0, 0.0, scaled))
    iota = lax.broadcasted_iota(jnp.int32, scaled.shape, 1)
    neg_sorted, order = lax.sort((neg, iota), dimension=1, is_stable=True, num_keys=1)  # [B, V] x2
    sorted_logits = -neg_sorted  # [B, V], descending
    rank = lax.broadcasted_iota(jnp.int32, scaled.shape, 1)
    k = jnp.where((top_ks <= 0) | (top_ks >= vocab), vocab, top_ks).astype(jnp.int32)  # [B]
    keep = rank < k[:, None]  # [B, V] top-k: exactly k
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)  # [B, V], renormalised over the top-k
    cum = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)  # exclusive
    top_p = top_ps.astype(jnp.float32)[:, None]
    keep &= (mass_before < top_p) | (rank == 0) | (top_p >= 1.0)
    # Greedy rows pick sorted position 0 (their first maximum, or first NaN): the argmax of sorted logits.
    pos = _gumbel_argmax(jnp.where(keep, sorted_logits, -jnp.inf), greedy, key)  # [B]
    return jnp.take_along_axis(order, pos[:, None], axis=1)[:, 0].astype(jnp.int32)
