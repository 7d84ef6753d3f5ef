"""The qkv projection with q/k norm, RoPE and the KV store in its epilogue (`kernels.matmul_qk_norm_rope_store`)
against the two kernels it replaces (`matmul`, then `qk_norm_rope_store(_fp8)`) and against its reference.

CPU: the kernels in interpret mode on small shapes: one and several row tiles, K in one and several steps,
both head dims, GQA groups 1-4. fp8 caches take the entry's fallback (the two kernels), tested too. Every
case poisons cache pages with NaN and writes into permuted pages with padding rows (slot -1); unwritten
slots must come back bit-exact. GPU: compiled, on Qwen3-0.6B's shapes at the engine's decode buckets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import matmul_qk_norm_rope_store, matmul_qk_norm_rope_store_reference
from nanovllm_jax.kernels.gemm import Tiling, matmul
from nanovllm_jax.kernels.matmul_qk_norm_rope_store import _fused_tiling, default_tiling
from nanovllm_jax.kernels.qk_norm_rope_store import qk_norm_rope_store, qk_norm_rope_store_fp8
from test_kernels_qk_norm_rope_store import EPS, THETA, _bits, _case, _fp8_case, _signed_codes

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
reference = jax.jit(matmul_qk_norm_rope_store_reference, static_argnames=("theta", "eps"))


def _inputs(tokens, num_heads, kv_heads, head_dim, hidden, fp8, seed=0):
    """(x, w, caches, keyword arguments): the caches and slots of the qk kernel's test cases."""
    pages = max(6, tokens // 12 + 2)  # room for every token's slot
    case = (_fp8_case if fp8 else _case)(
        tokens, num_heads, kv_heads, head_dim, jnp.bfloat16, num_pages=pages, seed=seed
    )
    rng = np.random.default_rng(seed + 7)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.bfloat16)
    w = jnp.asarray(
        3 * rng.standard_normal((hidden, (num_heads + 2 * kv_heads) * head_dim)) / np.sqrt(hidden), jnp.bfloat16
    )
    caches = (case["k_cache"], case["v_cache"]) + ((case["k_scale"], case["v_scale"]) if fp8 else ())
    kw = {name: case[name] for name in ("positions", "slot_mapping", "q_norm", "k_norm")}
    return x, w, caches, dict(kw, theta=THETA, eps=EPS)


def _unfused(x, w, caches, kw):
    """The two kernels the fused one replaces, as the engine ran them before."""
    qkv = matmul(x, w, interpret=INTERPRET)
    store = qk_norm_rope_store_fp8 if len(caches) == 4 else qk_norm_rope_store
    q, *caches = store(*[jnp.array(c) for c in caches], qkv, **kw, interpret=INTERPRET)
    return q, tuple(caches)


def _written(slot_mapping, shape):
    """[S, P] bool: the slots the step writes."""
    slots = np.asarray(slot_mapping)
    slots = slots[slots >= 0]
    out = np.zeros((shape[0], shape[2]), bool)
    out[slots // shape[2], slots % shape[2]] = True
    return out


def _assert_close(got, want, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any() and not np.isnan(want).any()
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < tol, f"relative error {err:.2e}"


def _check(got, want, before, slot_mapping):
    """got and want (q, caches): q and the written rows close (k bytes within one e4m3 step), every unwritten
    slot bit-exact as it was (the NaN pages among them)."""
    (q, caches), (want_q, want_caches) = got, want
    assert q.shape == want_q.shape and q.dtype == want_q.dtype
    _assert_close(q, want_q)
    written = _written(slot_mapping, before[0].shape)
    for name, c, w, b in zip(("k", "v", "k scale", "v scale"), caches, want_caches, before, strict=False):
        c, w, b = (np.asarray(a).swapaxes(1, 2) for a in (c, w, b))  # [S, P, K, ...]: a slot per [S, P] entry
        np.testing.assert_array_equal(_bits(c[~written]), _bits(b[~written]), err_msg=f"unwritten {name} slots")
        if c.dtype == np.uint8:
            steps = np.abs(_signed_codes(c[written]) - _signed_codes(w[written]))
            assert steps.max() <= 1, f"{name} bytes {steps.max()} e4m3 steps apart"
        else:
            _assert_close(c[written], w[written])
    assert np.isnan(np.asarray(before[-1], np.float32)).any()  # the poisoned pages were there


def _tiling(block_m, head_dim, block_k=128, num_stages=4):
    return Tiling(block_m=block_m, block_n=head_dim, block_k=block_k, split_k=1, num_stages=num_stages)


CASES = [
    # tokens, q heads, kv heads, head dim, hidden, row tile, K step
    (16, 4, 2, 64, 256, 16, 128),  # one row tile, K in two steps
    (32, 2, 1, 128, 128, 32, 128),  # group 2, one step of K
    (48, 8, 2, 64, 384, 16, 128),  # group 4, three row tiles, three steps of K
    (128, 3, 3, 64, 256, 64, 64),  # group 1, two 64-row tiles, four steps of K
]


@pytest.mark.parametrize("tokens,num_heads,kv_heads,head_dim,hidden,block_m,block_k", CASES)
def test_matches_the_unfused_kernels_and_the_reference(tokens, num_heads, kv_heads, head_dim, hidden, block_m, block_k):
    x, w, caches, kw = _inputs(tokens, num_heads, kv_heads, head_dim, hidden, False)
    tiling = _tiling(block_m, head_dim, block_k)
    got = matmul_qk_norm_rope_store(x, w, tuple(jnp.array(c) for c in caches), **kw, tiling=tiling, interpret=INTERPRET)
    unfused = _unfused(x, w, caches, kw)
    _check(got, unfused, caches, kw["slot_mapping"])
    _check(got, reference(x, w, caches, **kw), caches, kw["slot_mapping"])
    # The v rows are the projection's output rounded to bf16, summed in the unfused GEMM's K steps.
    written = _written(kw["slot_mapping"], caches[0].shape)
    v, want_v = (np.asarray(a[1][1]).swapaxes(1, 2)[written] for a in (got, unfused))
    np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(want_v, np.float32), rtol=2**-7, atol=0)


def test_which_calls_fuse():
    """By default: bf16/f16 up to `gemm.MAX_ROWS` rows in multiples of 16, on a GPU or in interpret
    mode, and not with fp8 caches (see the module docstring); the rest runs the two kernels (or references)."""
    x = jnp.zeros((256, 128), jnp.bfloat16)
    fuse = lambda x, fp8=False, interpret=True: _fused_tiling(x, 64, 8, fp8, None, interpret)  # noqa: E731
    assert fuse(x) == default_tiling(256, 8, 64) and fuse(x, fp8=True) is None
    assert fuse(x[:16]) == default_tiling(16, 8, 64) and fuse(x[:136]) is None and fuse(x[:8]) is None
    assert fuse(x.astype(jnp.float32)) is None and fuse(jnp.zeros((1024, 128), jnp.bfloat16)) is None
    assert (fuse(x, interpret=False) is None) == (not ON_GPU)  # the CPU runs the references
    assert _fused_tiling(x, 64, 8, True, _tiling(16, 64), True) is None  # fp8: never, whatever the tiling


@pytest.mark.parametrize("fp8", [False, True])
def test_shapes_outside_the_kernel_run_the_unfused_path(fp8):
    """float32 (no bf16 dot), and rows that are not a multiple of 16: the two kernels (or references) run."""
    x, w, caches, kw = _inputs(16, 4, 2, 64, 128, fp8)
    f32 = dict(kw, q_norm=kw["q_norm"].astype(jnp.float32), k_norm=kw["k_norm"].astype(jnp.float32))
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    caches32 = caches if fp8 else tuple(c.astype(jnp.float32) for c in caches)
    got = matmul_qk_norm_rope_store(x32, w32, tuple(jnp.array(c) for c in caches32), **f32, interpret=INTERPRET)
    _check(got, reference(x32, w32, caches32, **f32), caches32, kw["slot_mapping"])
    rows = dict(kw, positions=kw["positions"][:8], slot_mapping=kw["slot_mapping"][:8])
    got = matmul_qk_norm_rope_store(x[:8], w, tuple(jnp.array(c) for c in caches), **rows, interpret=INTERPRET)
    _check(got, reference(x[:8], w, caches, **rows), caches, rows["slot_mapping"])


def test_default_tiling_fills_the_gpu():
    """Qwen3-0.6B (32 heads of q, k and v): the largest row tile that keeps 96 programs."""
    tiles = {m: default_tiling(m, 32, 128).block_m for m in (16, 64, 128, 256, 512)}
    assert tiles == {16: 16, 64: 16, 128: 32, 256: 64, 512: 64}
    assert default_tiling(256, 32, 128).block_n == 128


def test_input_checks():
    x, w, caches, kw = _inputs(16, 4, 2, 64, 128, False)
    run = lambda *a, **k: matmul_qk_norm_rope_store(*a, **dict(kw, **k), interpret=INTERPRET)  # noqa: E731
    with pytest.raises(ValueError, match="block_n = head_dim"):
        run(x, w, caches, tiling=Tiling(block_m=16, block_n=32, block_k=128, split_k=1))
    with pytest.raises(ValueError, match="does not tile"):
        run(x, w, caches, tiling=_tiling(32, 64))
    with pytest.raises(ValueError, match="caches must be"):
        run(x, w, caches[:1])
    with pytest.raises(ValueError, match="need x"):
        run(x, w[:64], caches)
    with pytest.raises(ValueError, match="qkv must be"):
        run(x, w[:, :-64], caches)
    with pytest.raises(ValueError, match="slot_mapping"):
        run(x, w, caches, slot_mapping=kw["slot_mapping"][:8])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 64, 128, 256])
def test_gpu_qwen3_0_6b_shapes(tokens):
    """Compiled, at the engine's decode buckets, with the default row tiles."""
    x, w, caches, kw = _inputs(tokens, 16, 8, 128, 1024, False)
    caches = tuple(jnp.concatenate([c] * 64) for c in caches)  # room for the slots
    slots = np.random.default_rng(1).permutation(caches[0].shape[0] * 16)[:tokens].astype(np.int32)
    slots[1::4] = -1
    kw = dict(kw, slot_mapping=jnp.asarray(slots))
    tiling = default_tiling(tokens, 32, 128)
    got = matmul_qk_norm_rope_store(x, w, tuple(jnp.array(c) for c in caches), **kw, tiling=tiling)
    _check(got, _unfused(x, w, caches, kw), caches, kw["slot_mapping"])
    _check(got, reference(x, w, caches, **kw), caches, kw["slot_mapping"])
