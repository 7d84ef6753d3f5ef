"""Tests for nanovllm_jax.layers.sampler (CPU, fast). Statistical tests use fixed seeds, so they are
deterministic; each chi-square test is at alpha = 1e-6, i.e. a correct sampler would fail one with a fresh
seed with probability 1e-6 (about 2e-5 summed over all the chi-square tests in this file)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nanovllm_jax.layers.sampler import argmax, gumbel_noise, sample

ALPHA = 1e-6
N = 20000  # draws per distribution

_sample = jax.jit(sample, static_argnames="use_top_k_top_p")


def _draw(logits, n, *, temperature=1.0, top_k=-1, top_p=1.0, seed=0, full=True):
    """n draws from one row of logits [V] (n identical rows of one batch) -> counts [V]."""
    logits = jnp.asarray(logits)
    toks = _sample(
        jnp.tile(logits[None], (n, 1)),
        jnp.full((n,), temperature, jnp.float32),
        jnp.full((n,), top_k, jnp.int32),
        jnp.full((n,), top_p, jnp.float32),
        jax.random.key(seed),
        use_top_k_top_p=full,
    )
    return np.bincount(np.asarray(toks), minlength=logits.shape[-1])


def _ref_probs(logits, temperature=1.0, top_k=-1, top_p=1.0):
    """Independent float64 numpy reference of the sampler's exact distribution [V]."""
    x = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-x, kind="stable")  # descending, ties by lower index
    v = x.shape[-1]
    k = v if top_k <= 0 or top_k >= v else top_k
    keep = np.zeros(v, bool)
    keep[order[:k]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        before = np.cumsum(p[order]) - p[order]  # mass strictly before each sorted token
        keep[order[(before >= top_p) & (np.arange(v) > 0)]] = False
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def _hf_probs(logits, temperature=1.0, top_k=-1, top_p=1.0):
    """HF's filtered distribution [V]: Temperature -> TopK -> TopP warpers, as generate() chains them."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    scores = torch.tensor(np.asarray(logits, np.float32))[None]
    scores = lp.TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores.double(), -1)[0].numpy()


def _assert_fits(counts, probs):
    """No draw outside the support; chi-square goodness of fit at ALPHA (bins with expected < 5 merged)."""
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "drew a token outside the support"
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    if len(obs) < 2:
        return
    pval = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert pval > ALPHA, f"chi-square p={pval:.2e}\nobs={obs}\nexp={np.round(exp, 1)}"


def _support(counts):
    return set(np.flatnonzero(counts).tolist())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("full", [False, True])
def test_greedy_rows_and_mixed_batch(dtype, full):
    b, v = 8, 1000
    logits = jax.random.normal(jax.random.key(1), (b, v)).astype(dtype) * 3
    temps = jnp.array([0, 1.0, 0, 0.7, 0, 2.0, 0, 1.0], jnp.float32)
    top_ks = jnp.array([5, -1, -1, 1, 3, -1, v, 1], jnp.int32)
    top_ps = jnp.array([0.5, 1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0], jnp.float32)
    if not full:
        top_ks, top_ps = jnp.full_like(top_ks, -1), jnp.ones_like(top_ps)
    argmax = np.asarray(jnp.argmax(logits.astype(jnp.float32), -1))
    for seed in range(5):
        toks = np.asarray(_sample(logits, temps, top_ks, top_ps, jax.random.key(seed), use_top_k_top_p=full))
        assert toks.dtype == np.int32 and toks.shape == (b,)
        greedy = np.asarray(temps) == 0
        np.testing.assert_array_equal(toks[greedy], argmax[greedy])
        assert ((toks >= 0) & (toks < v)).all()
        if full:  # top_k == 1 on a sampled row is greedy too
            np.testing.assert_array_equal(toks[[3, 7]], argmax[[3, 7]])
    # The sampled rows are really sampled: over seeds, row 1 (temperature 1, V=1000) varies.
    rows = [int(_sample(logits, temps, top_ks, top_ps, jax.random.key(s), use_top_k_top_p=full)[1]) for s in range(8)]
    assert len(set(rows)) > 1


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_matches_softmax(temperature, full):
    logits = np.random.default_rng(0).normal(size=16).astype(np.float32) * 1.5
    x = logits.astype(np.float64) / temperature
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # exact softmax, independent of the sampler
    _assert_fits(_draw(logits, N, temperature=temperature, full=full, seed=int(temperature * 10)), probs)


# (temperature, top_k, top_p): random distinct logits, so HF's rules and ours pick the same support.
HF_CASES = [
    (1.0, 5, 1.0),
    (0.7, 12, 1.0),
    (1.0, -1, 0.7),
    (1.5, -1, 0.9),
    (0.8, 10, 0.8),
    (1.0, 3, 0.5),
    (1.0, 1, 1.0),
    (2.0, 20, 0.95),
]


@pytest.mark.parametrize("temperature,top_k,top_p", HF_CASES)
def test_matches_hf_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(7).normal(size=32).astype(np.float32) * 2
    hf = _hf_probs(logits, temperature, top_k, top_p)
    ref = _ref_probs(logits, temperature, top_k, top_p)
    assert set(np.flatnonzero(hf > 0)) == set(np.flatnonzero(ref > 0))  # exact same support
    np.testing.assert_allclose(ref, hf, atol=1e-6)
    counts = _draw(logits, N, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    _assert_fits(counts, hf)
    # Every kept token with expected count >= 30 is drawn at all (P(miss) < e^-30).
    assert _support(counts) >= set(np.flatnonzero(hf * N >= 30))


def test_top_k_keeps_exactly_k_with_ties():
    logits = np.array([1.0, 3.0, 3.0, 3.0, 0.0, 2.0, 3.0], np.float32)  # four tokens tie at the max
    assert _support(_draw(logits, 4000, top_k=2)) == {1, 2}  # ties broken by lower index
    assert _support(_draw(logits, 4000, top_k=5)) == {1, 2, 3, 5, 6}
    assert _support(_draw(logits, 4000, top_k=4)) == {1, 2, 3, 6}
    # HF's TopKLogitsWarper keeps every token tied with the k-th, so more than k: the documented difference.
    assert set(np.flatnonzero(_hf_probs(logits, top_k=2) > 0)) == {1, 2, 3, 6}
    counts = _draw(logits, N, top_k=3, seed=5)  # uniform over the 3 kept tied tokens
    _assert_fits(counts, _ref_probs(logits, top_k=3))
    assert _support(_draw(logits, 4000, top_k=len(logits))) == set(range(7))  # k >= V: off


@pytest.mark.parametrize("perm", [[0, 1, 2, 3], [3, 1, 0, 2]])
@pytest.mark.parametrize(
    "top_p,kept", [(0.8, 2), (0.81, 3), (0.5, 1), (0.49, 1), (0.95, 3), (0.96, 4), (0.01, 1), (1.0, 4)]
)
def test_top_p_smallest_set_with_mass_at_least_p(top_p, kept, perm):
    probs = np.array([0.5, 0.3, 0.15, 0.05])  # descending; shown at permuted token positions
    logits = np.empty(4, np.float32)
    logits[perm] = np.log(probs)
    counts = _draw(logits, 4000, top_p=top_p)
    assert _support(counts) == set(np.asarray(perm)[:kept].tolist())
    _assert_fits(counts, _ref_probs(logits, top_p=top_p))


def test_top_p_applies_after_top_k_renormalisation():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    # After top-k=3 the mass is [0.526, 0.316, 0.158]: mass before the third is 0.842 >= 0.83, so 2 tokens
    # (without renormalisation it would be 0.8 < 0.83, so 3).
    assert _support(_draw(logits, 4000, top_k=3, top_p=0.83)) == {0, 1}
    assert _support(_draw(logits, 4000, top_k=3, top_p=0.85)) == {0, 1, 2}
    # Temperature is applied before top-p: at T=2 the probs are ~[0.36, 0.28, 0.2, 0.11]-ish, p=0.6 keeps 2.
    ref = _ref_probs(logits, temperature=2.0, top_p=0.6)
    assert _support(_draw(logits, 4000, temperature=2.0, top_p=0.6)) == set(np.flatnonzero(ref > 0)) == {0, 1}


def test_per_row_parameters_in_one_batch():
    logits = np.random.default_rng(2).normal(size=(4, 24)).astype(np.float32)
    params = [(1.0, 4, 1.0), (0.5, -1, 0.6), (1.3, -1, 1.0), (1.0, 8, 0.7)]
    reps = 10000
    toks = np.asarray(
        _sample(
            jnp.asarray(np.repeat(logits, reps, 0)),
            jnp.asarray(np.repeat([p[0] for p in params], reps), jnp.float32),
            jnp.asarray(np.repeat([p[1] for p in params], reps), jnp.int32),
            jnp.asarray(np.repeat([p[2] for p in params], reps), jnp.float32),
            jax.random.key(11),
            use_top_k_top_p=True,
        )
    ).reshape(4, reps)
    for row, (t, k, p) in enumerate(params):
        _assert_fits(np.bincount(toks[row], minlength=24), _ref_probs(logits[row], t, k, p))


@pytest.mark.parametrize("full", [False, True])
def test_reproducible_with_same_key(full):
    b, v = 64, 500
    logits = jax.random.normal(jax.random.key(0), (b, v))
    args = (logits, jnp.ones(b), jnp.full(b, 50, jnp.int32), jnp.full(b, 0.9))
    if not full:
        args = (logits, jnp.ones(b), jnp.full(b, -1, jnp.int32), jnp.ones(b))
    base = jax.random.key(1234)
    a = _sample(*args, jax.random.fold_in(base, 7), use_top_k_top_p=full)
    a2 = _sample(*args, jax.random.fold_in(jax.random.key(1234), 7), use_top_k_top_p=full)
    c = _sample(*args, jax.random.fold_in(base, 8), use_top_k_top_p=full)
    np.testing.assert_array_equal(a, a2)
    assert (np.asarray(a) != np.asarray(c)).any()
    eager = sample(*args, jax.random.fold_in(base, 7), use_top_k_top_p=full)
    np.testing.assert_array_equal(a, eager)


def _primitives(jaxpr):
    """Names of all primitives in a (closed) jaxpr, nested jaxprs (pjit bodies, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for val in eqn.params.values():
            for sub in val if isinstance(val, (tuple, list)) else (val,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= _primitives(sub)
    return names


def test_cheap_path_has_no_sort():
    b, v = 4, 151936
    args = (
        jnp.zeros((b, v), jnp.bfloat16),
        jnp.ones(b),
        jnp.full(b, -1, jnp.int32),
        jnp.ones(b),
        jax.random.key(0),
    )
    cheap = jax.make_jaxpr(functools.partial(sample, use_top_k_top_p=False))(*args)
    full = jax.make_jaxpr(functools.partial(sample, use_top_k_top_p=True))(*args)
    assert not {"sort", "top_k", "approx_top_k"} & _primitives(cheap), _primitives(cheap)
    assert "sort" in _primitives(full)
    assert not re.search(r"\bsort\b", str(cheap))  # the printed form, as a second check


def test_cheap_path_same_distribution_as_full_path():
    logits = np.random.default_rng(4).normal(size=20).astype(np.float32) * 2
    for t in (0.6, 1.4):
        cheap = _draw(logits, N, temperature=t, full=False, seed=21)
        full = _draw(logits, N, temperature=t, full=True, seed=22)  # no row uses top-k / top-p
        probs = _ref_probs(logits, t)
        _assert_fits(cheap, probs)
        _assert_fits(full, probs)
        # And directly against each other: chi-square two-sample homogeneity test over tokens with draws.
        table = np.stack([cheap, full])[:, (cheap + full) > 0]
        assert stats.chi2_contingency(table).pvalue > ALPHA


def test_full_vocab_size_batch():
    b, v = 4, 151936
    logits = jax.random.normal(jax.random.key(5), (b, v), jnp.float32) * 4
    temps = jnp.array([0.0, 1.0, 0.8, 1.0], jnp.float32)
    top_ks = jnp.array([-1, 5, -1, -1], jnp.int32)
    top_ps = jnp.array([1.0, 1.0, 1e-6, 0.9], jnp.float32)
    toks = np.asarray(_sample(logits, temps, top_ks, top_ps, jax.random.key(0), use_top_k_top_p=True))
    lg = np.asarray(logits)
    assert toks[0] == lg[0].argmax()
    assert toks[1] in set(np.argsort(-lg[1])[:5].tolist())
    assert toks[2] == lg[2].argmax()  # a tiny top_p keeps only the top token
    assert 0 <= toks[3] < v


def _hard_rows(v, rng):
    """Rows [R, V] float32 that stress argmax: ties inside chunks and across chunk borders, -inf, NaN, +-0."""
    chunk = v // next(c for c in (128, 64, 32, 16, 8, 4, 2, 1) if v % c == 0)  # as sampler.argmax splits
    rows = []

    def row(idx=(), val=0.0, fill=None):
        r = rng.normal(size=v) if fill is None else np.full(v, fill)
        r[np.asarray(idx, int) % v] = val
        rows.append(r)

    row()
    row([v - 1], 9.0)  # max at the last index
    for border in (chunk, 2 * chunk, v - chunk):  # the same max at both sides of a chunk border
        row([border - 1, border], 7.0)
    row([3, chunk, chunk + 3, v - 1], 5.0)  # ties inside a chunk and in later chunks
    row([chunk + 2, chunk + 1, 2 * chunk - 1], 6.0)
    row(fill=0.0)  # all tied
    row(range(v // 2), -0.0, fill=0.0)  # -0.0 and +0.0 tie
    row(fill=-np.inf)
    row([v - 1], -1e30, fill=-np.inf)
    row(rng.integers(0, v, size=max(v // 3, 1)), -np.inf)
    row(fill=np.inf)
    row([v // 2], np.nan)
    row([v - 1, chunk + 1, v // 2], np.nan)
    row([v - 1], np.nan, fill=-np.inf)
    row([v - 1], np.nan)
    rows[-1][0] = np.inf  # +inf before the NaN: must stay the last row
    return np.stack(rows).astype(np.float32)


NAN_AFTER_INF_ROW = -1  # the last row of _hard_rows


@pytest.mark.parametrize("v", [1, 7, 20, 24, 128, 500, 640, 2 * 1187, 151936])
def test_two_stage_argmax_matches_jnp_argmax(v):
    rows = _hard_rows(v, np.random.default_rng(v))
    want = np.argmax(rows, -1)  # numpy: the first maximum, or the first NaN
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(jnp.asarray(rows))), want)
    if jax.default_backend() == "cpu":  # XLA:GPU's jnp.argmax may pick another of several NaNs
        np.testing.assert_array_equal(np.asarray(jnp.argmax(rows, -1)), want)
    # Temperature-0 rows of both paths are exactly the argmax too (the full path: but for +inf before a NaN).
    b = rows.shape[0]
    args = (jnp.asarray(rows), jnp.zeros(b), jnp.full(b, -1, jnp.int32), jnp.ones(b), jax.random.key(0, impl="rbg"))
    np.testing.assert_array_equal(np.asarray(_sample(*args, use_top_k_top_p=False)), want)
    full = np.asarray(_sample(*args, use_top_k_top_p=True))
    np.testing.assert_array_equal(full[:NAN_AFTER_INF_ROW], want[:NAN_AFTER_INF_ROW])
    assert full[NAN_AFTER_INF_ROW] == 0  # the +inf at 0 sorts with the NaN at V - 1: the lower index wins
    # Sampled rows of a row with a NaN draw the first NaN; rows with one finite token draw it.
    temps = jnp.ones(b)
    for use in (False, True):
        toks = np.asarray(_sample(jnp.asarray(rows), temps, *args[2:], use_top_k_top_p=use))
        for i, r in enumerate(rows):
            if np.isnan(r).any() and not (use and np.isposinf(r).any()):
                assert toks[i] == np.flatnonzero(np.isnan(r))[0]
            elif np.isfinite(r).sum() == 1:
                assert toks[i] == np.flatnonzero(np.isfinite(r))[0]


def test_gumbel_noise_distribution():
    key = jax.random.fold_in(jax.random.key(3, impl="rbg"), 5)
    g = np.asarray(gumbel_noise(key, (16, 1 << 16)), np.float64)
    assert np.isfinite(g).all()
    assert stats.kstest(g.ravel(), stats.gumbel_r.cdf).pvalue > ALPHA
    for row in g[[0, 1, 15]]:  # each row on its own
        assert stats.kstest(row, stats.gumbel_r.cdf).pvalue > ALPHA
    # The upper tail, which decides the argmax over a large vocabulary: P(g > t) = 1 - exp(-exp(-t)).
    for t in (4.0, 7.0, 10.0):
        p = -np.expm1(-np.exp(-t))
        assert stats.binomtest(int((g > t).sum()), g.size, p).pvalue > ALPHA
    # Neighbouring rows and columns are uncorrelated; another key gives other noise.
    assert abs(np.corrcoef(g[0], g[1])[0, 1]) < 5.5 / np.sqrt(g.shape[1])
    assert abs(np.corrcoef(g[0, :-1], g[0, 1:])[0, 1]) < 5.5 / np.sqrt(g.shape[1])
    g2 = np.asarray(gumbel_noise(jax.random.fold_in(jax.random.key(3, impl="rbg"), 6), g.shape))
    assert abs(np.corrcoef(g.ravel(), g2.ravel())[0, 1]) < 5.5 / np.sqrt(g.size)
    np.testing.assert_array_equal(np.asarray(gumbel_noise(key, g.shape)), g.astype(np.float32))


@pytest.mark.parametrize("full", [False, True])
def test_draws_independent_across_rows_and_steps(full):
    """Pairs of neighbouring rows, and the same row under the keys of consecutive steps, draw independently:
    chi-square tests of independence on the joint counts."""
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    n = N
    base = jax.random.key(9, impl="rbg")
    draw = lambda key: np.asarray(  # noqa: E731
        _sample(
            jnp.tile(jnp.asarray(logits)[None], (n, 1)),
            jnp.ones(n),
            jnp.full(n, -1, jnp.int32),
            jnp.ones(n),
            key,
            use_top_k_top_p=full,
        )
    )
    a, b = draw(jax.random.fold_in(base, 0)), draw(jax.random.fold_in(base, 1))
    for x, y in [(a[0::2], a[1::2]), (a, b)]:
        table = np.zeros((4, 4))
        np.add.at(table, (x, y), 1)
        assert stats.chi2_contingency(table).pvalue > ALPHA
    _assert_fits(np.bincount(a, minlength=4), _ref_probs(logits))


@pytest.mark.parametrize("full", [False, True])
def test_distribution_across_chunk_borders(full):
    """V = 640: the argmax runs as 128 chunks of 5; the mass sits on tokens at and around chunk borders."""
    v = 640
    logits = np.full(v, -4.0, np.float32)
    hot = [0, 4, 5, 9, 10, 319, 320, 634, 635, 639]
    logits[hot] = np.random.default_rng(8).normal(size=len(hot)) + 1.0
    counts = _draw(logits, N, temperature=1.0, full=full, seed=31)
    _assert_fits(counts, _ref_probs(logits))


def test_no_vocabulary_sized_random_bits():
    """The noise is hashed elementwise: the only random bits drawn are two scalar words."""
    b, v = 4, 151936
    args = (jnp.zeros((b, v)), jnp.ones(b), jnp.full(b, -1, jnp.int32), jnp.ones(b), jax.random.key(0, impl="rbg"))
    for full in (False, True):
        jaxpr = jax.make_jaxpr(functools.partial(sample, use_top_k_top_p=full))(*args)
        shapes = re.findall(r"random_bits\[[^\]]*shape=\(([^)]*)\)", str(jaxpr))
        assert shapes == ["2,"], shapes
