"""On-device token sampler, called inside the engine's jitted step. Rows with temperature 0 take the argmax
of the logits; the others draw from softmax(logits / temperature) restricted first by top-k, then by top-p
(on the top-k-renormalised distribution), with the Gumbel-max trick: `kernels.gumbel_argmax`, whose noise is
a counter-based hash of (seed, row, column) computed where it is added, so no [B, V] random bits are
written; greedy rows go through the same argmax without noise. Top-k keeps
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
from jax import lax

from nanovllm_jax import kernels
from nanovllm_jax.kernels.sampling import argmax  # noqa: F401 - part of this module's interface


def _seed(key):
    """The two uint32 words of a step's noise, drawn from its PRNG key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def gumbel_noise(key, shape):
    """Standard Gumbel noise [B, V] float32 that a draw under `key` adds (`kernels.sampling.gumbel_noise`)."""
    return kernels.sampling.gumbel_noise(_seed(key), shape)


def sample(logits, temperatures, top_ks, top_ps, key, *, use_top_k_top_p: bool):
    """logits [B, V] any float; temperatures [B] f32 (0 = greedy); top_ks [B] i32 (-1 or >= V: off);
    top_ps [B] f32 (1.0: off); key: a PRNG key. Returns token ids [B] int32; same key -> same tokens."""
    logits = logits.astype(jnp.float32)  # [B, V]
    vocab = logits.shape[-1]
    greedy = temperatures <= 0  # [B]
    # Scale by 1 / temperature (a multiply per element, not a divide), finite even for a subnormal temperature.
    inv_temps = jnp.minimum(1.0 / jnp.where(greedy, 1.0, temperatures), jnp.finfo(jnp.float32).max).astype(jnp.float32)
    if not use_top_k_top_p:
        return kernels.gumbel_argmax(logits, inv_temps, greedy, _seed(key))
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
    pos = kernels.gumbel_argmax(jnp.where(keep, sorted_logits, -jnp.inf), jnp.ones_like(inv_temps), greedy, _seed(key))
    return jnp.take_along_axis(order, pos[:, None], axis=1)[:, 0].astype(jnp.int32)
