"""The fused q/k RMSNorm + RoPE + K/V store kernel against its jnp reference, and the reference against
the model's unfused math (RMSNorm, `apply_rope`, `store_kv_reference`).

On the CPU the kernel runs in interpret mode on tiny shapes; the `gpu` test runs it compiled on Qwen3-0.6B's
shapes. Every case poisons some cache pages with NaN, writes into permuted pages with padding tokens
(slot -1), and compares the v rows and every slot the step does not write bit-exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import (
    qk_norm_rope_store,
    qk_norm_rope_store_fp8,
    qk_norm_rope_store_fp8_reference,
    qk_norm_rope_store_reference,
    store_kv_fp8_reference,
    store_kv_reference,
)

from nanovllm_jax.layers.rotary import apply_rope
from nanovllm_jax.models.qwen3 import RMSNorm

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU  # CPU: the kernel in interpret mode; GPU: compiled
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # max |out - ref| / max |ref| (no dots: fp32 stays fp32)
THETA, EPS = 1e6, 1e-6  # Qwen3's
# The reference as the engine runs it, under jit: eagerly, XLA's float32 pow (the RoPE frequencies) can
# differ from the jitted one by an ulp, which at position 4000 moves an angle by ~1e-4 rad.
reference = jax.jit(qk_norm_rope_store_reference, static_argnames=("theta", "eps"))
reference_fp8 = jax.jit(qk_norm_rope_store_fp8_reference, static_argnames=("theta", "eps"))
NAN_BYTE = 0x7F  # float8_e4m3fn NaN


def _case(tokens, num_heads, kv_heads, head_dim, dtype, block_size=16, num_pages=6, seed=0):
    """Random inputs: caches with pages 0 and 3 all NaN (free pages), slots in permuted pages, every
    fourth token from the second on a padding token (-1), positions up to 4000."""
    rng = np.random.default_rng(seed)
    shape = (num_pages, kv_heads, block_size, head_dim)
    k_cache, v_cache = rng.standard_normal(shape), rng.standard_normal(shape)
    k_cache[[0, 3]] = v_cache[[0, 3]] = np.nan
    slots = rng.permutation(num_pages * block_size)[:tokens].astype(np.int32)
    slots[1::4] = -1
    positions = rng.integers(0, 4096, tokens).astype(np.int32)
    positions[-1] = 4000
    qkv = 3 * rng.standard_normal((tokens, (num_heads + 2 * kv_heads) * head_dim))
    q_norm, k_norm = 1 + 0.3 * rng.standard_normal((2, head_dim))
    return dict(
        k_cache=jnp.asarray(k_cache, dtype),
        v_cache=jnp.asarray(v_cache, dtype),
        qkv=jnp.asarray(qkv, dtype),
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slots),
        q_norm=jnp.asarray(q_norm, dtype),
        k_norm=jnp.asarray(k_norm, dtype),
    )


def _fp8_case(tokens, num_heads, kv_heads, head_dim, dtype, block_size=16, num_pages=6, seed=0):
    """`_case` with the fp8 layout: random e4m3 bytes and scales, pages 0 and 3 NaN bytes and NaN scales."""
    args = _case(tokens, num_heads, kv_heads, head_dim, dtype, block_size, num_pages, seed)
    rng = np.random.default_rng(seed + 1)
    shape = args["k_cache"].shape
    pages, scales = [], []
    for _ in range(2):
        data = rng.integers(0, 256, shape, dtype=np.uint8) & 0xF7  # no NaN byte (0x7F / 0xFF) among them
        scale = rng.uniform(0.01, 1, shape[:3]).astype(np.float32)
        data[[0, 3]], scale[[0, 3]] = NAN_BYTE, np.nan
        pages.append(jnp.asarray(data))
        scales.append(jnp.asarray(scale))
    rest = {name: a for name, a in args.items() if not name.endswith("_cache")}
    return dict(k_cache=pages[0], v_cache=pages[1], k_scale=scales[0], v_scale=scales[1], **rest)


def _signed_codes(data):
    """e4m3 bytes -> integers monotonic in the value (sign and magnitude code): adjacent values differ by 1."""
    data = np.asarray(data).astype(np.int32)
    return np.where(data & 0x80, -(data & 0x7F), data & 0x7F)


def _bits(x):
    """The raw bits of an array (unsigned ints), for bit-exact comparisons that hold for NaN too."""
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any() and not np.isnan(ref).any()
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < TOL[dtype], f"relative error {err:.2e}"


def _check_against_reference(args, dtype, **kw):
    """The kernel's (q, k_cache, v_cache) against the reference's: q and written k rows within TOL, the
    v cache equal, unwritten k slots unchanged (NaN pages stay NaN)."""
    slots = np.asarray(args["slot_mapping"])
    block_size = args["k_cache"].shape[2]
    before_k = np.asarray(args["k_cache"])
    want_q, want_k, want_v = reference(**args, theta=THETA, eps=EPS)
    q, k_cache, v_cache = qk_norm_rope_store(**args, theta=THETA, eps=EPS, interpret=INTERPRET, **kw)
    assert q.shape == want_q.shape and q.dtype == dtype
    _assert_close(q, want_q, dtype)
    np.testing.assert_array_equal(_bits(v_cache), _bits(want_v))
    live = slots >= 0
    page, offset = slots[live] // block_size, slots[live] % block_size
    _assert_close(np.asarray(k_cache)[page, :, offset], np.asarray(want_k)[page, :, offset], dtype)
    written = np.zeros(before_k.shape[0:1] + before_k.shape[2:3], bool)
    written[page, offset] = True
    untouched = np.asarray(k_cache).transpose(0, 2, 1, 3)[~written]
    np.testing.assert_array_equal(_bits(untouched), _bits(before_k.transpose(0, 2, 1, 3)[~written]))
    assert np.isnan(untouched.astype(np.float32)).any()  # the poisoned pages are among them


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "tokens,num_heads,kv_heads,head_dim",
    [
        (1, 2, 2, 64),  # one decode token, group 1
        (3, 4, 2, 128),  # group 2
        (17, 12, 3, 64),  # group 4, head counts not powers of two
        (17, 3, 3, 128),  # group 1, 3 heads
    ],
)
@pytest.mark.parametrize("rows_per_program", [None, (4, 2)])  # None: one row a program at these sizes
def test_matches_reference(dtype, tokens, num_heads, kv_heads, head_dim, rows_per_program):
    args = _case(tokens, num_heads, kv_heads, head_dim, dtype)
    _check_against_reference(args, dtype, rows_per_program=rows_per_program)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reference_is_the_unfused_math(dtype):
    """Bit for bit the model's path before fusion: split, RMSNorm modules, `apply_rope`, `store_kv_reference`."""
    args = _case(17, 4, 2, 64, dtype)
    num_heads, kv_heads, head_dim = 4, 2, 64

    @jax.jit
    def unfused(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm):
        q, k, v = jnp.split(qkv, [num_heads * head_dim, (num_heads + kv_heads) * head_dim], axis=-1)
        q = q.reshape(-1, num_heads, head_dim)
        k, v = k.reshape(-1, kv_heads, head_dim), v.reshape(-1, kv_heads, head_dim)
        q_rms, k_rms = RMSNorm(head_dim, EPS, dtype), RMSNorm(head_dim, EPS, dtype)
        q_rms.weight[...], k_rms.weight[...] = q_norm, k_norm
        q, k = q_rms(q), k_rms(k)
        q, k = apply_rope(q, positions, THETA), apply_rope(k, positions, THETA)
        return (q, *store_kv_reference(k_cache, v_cache, k, v, slot_mapping))

    fused = jax.jit(functools.partial(qk_norm_rope_store_reference, theta=THETA, eps=EPS))
    for got, want in zip(fused(**args), unfused(**args), strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(want))


def _check_fp8_against_reference(args, dtype, **kw):
    """The fp8 kernel's (q, pages, scales) against the reference's: q within TOL; v bytes and scales and every
    unwritten slot bit-exact (NaN pages stay NaN); the k row, the kernel's own norm and RoPE, an ulp off at
    most, so each k byte within one e4m3 step and each k scale within TOL."""
    want = reference_fp8(**args, theta=THETA, eps=EPS)
    got = qk_norm_rope_store_fp8(**args, theta=THETA, eps=EPS, interpret=INTERPRET, **kw)
    assert got[0].shape == want[0].shape and got[0].dtype == dtype
    _assert_close(got[0], want[0], dtype)
    _, k_cache, v_cache, k_scale, v_scale = (np.asarray(a) for a in got)
    _, want_k, want_v, want_ks, want_vs = (np.asarray(a) for a in want)
    np.testing.assert_array_equal(v_cache, want_v)
    np.testing.assert_array_equal(_bits(v_scale), _bits(want_vs))
    slots = np.asarray(args["slot_mapping"])
    live = slots >= 0
    block_size = k_cache.shape[2]
    page, offset = slots[live] // block_size, slots[live] % block_size
    written = np.zeros((k_cache.shape[0], block_size), bool)
    written[page, offset] = True
    for got_a, want_a in ((k_cache, want_k), (k_scale, want_ks)):
        np.testing.assert_array_equal(_bits(got_a.swapaxes(1, 2)[~written]), _bits(want_a.swapaxes(1, 2)[~written]))
    assert np.isnan(k_scale.swapaxes(1, 2)[~written]).any()  # the poisoned pages are among the unwritten
    steps = np.abs(_signed_codes(k_cache[page, :, offset]) - _signed_codes(want_k[page, :, offset]))
    assert steps.max() <= 1, f"k bytes {steps.max()} e4m3 steps apart"
    _assert_close(k_scale[page, :, offset], want_ks[page, :, offset], dtype)


@pytest.mark.parametrize(
    "tokens,num_heads,kv_heads,head_dim,dtype",
    [(1, 2, 2, 64, jnp.bfloat16), (17, 12, 3, 64, jnp.float32), (9, 8, 2, 128, jnp.bfloat16)],
)
@pytest.mark.parametrize("rows_per_program", [None, (8, 2)])
def test_fp8_matches_reference(tokens, num_heads, kv_heads, head_dim, dtype, rows_per_program):
    args = _fp8_case(tokens, num_heads, kv_heads, head_dim, dtype)
    _check_fp8_against_reference(args, dtype, rows_per_program=rows_per_program)


def test_fp8_reference_is_the_unfused_math():
    """Bit for bit the unfused fp8 path: split, RMSNorm modules, `apply_rope`, `store_kv_fp8_reference`."""
    args = _fp8_case(17, 4, 2, 64, jnp.bfloat16)
    num_heads, kv_heads, head_dim = 4, 2, 64

    @jax.jit
    def unfused(k_cache, v_cache, k_scale, v_scale, qkv, positions, slot_mapping, q_norm, k_norm):
        q, k, v = jnp.split(qkv, [num_heads * head_dim, (num_heads + kv_heads) * head_dim], axis=-1)
        q = q.reshape(-1, num_heads, head_dim)
        k, v = k.reshape(-1, kv_heads, head_dim), v.reshape(-1, kv_heads, head_dim)
        q_rms, k_rms = RMSNorm(head_dim, EPS, jnp.bfloat16), RMSNorm(head_dim, EPS, jnp.bfloat16)
        q_rms.weight[...], k_rms.weight[...] = q_norm, k_norm
        q, k = apply_rope(q_rms(q), positions, THETA), apply_rope(k_rms(k), positions, THETA)
        return (q, *store_kv_fp8_reference(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping))

    for got, want in zip(reference_fp8(**args, theta=THETA, eps=EPS), unfused(**args), strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_fp8_under_outer_jit_donated():
    """The engine's use: the fp8 entry inside a jitted step that donates the four cache arrays."""
    args = _fp8_case(5, 4, 2, 64, jnp.bfloat16, seed=1)
    want = reference_fp8(**args, theta=THETA, eps=EPS)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def step(*arrays):
        q, *cache = qk_norm_rope_store_fp8(*arrays, theta=THETA, eps=EPS, interpret=INTERPRET)
        return q.sum(), cache

    caches = [args[name] for name in ("k_cache", "v_cache", "k_scale", "v_scale")]
    _, got = step(*args.values())
    assert all(c.is_deleted() for c in caches)  # donated: the new arrays reuse their buffers
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[2]))  # the v pages
    np.testing.assert_array_equal(_bits(got[3]), _bits(want[4]))  # the v scales


def test_under_outer_jit_donated():
    """The engine's use: the entry inside its own jitted step, the caches donated by that jit."""
    args = _case(5, 4, 2, 64, jnp.bfloat16, seed=1)
    want = reference(**args, theta=THETA, eps=EPS)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm):
        q, k_cache, v_cache = qk_norm_rope_store(
            k_cache, v_cache, qkv, positions, slot_mapping, q_norm, k_norm, theta=THETA, eps=EPS, interpret=INTERPRET
        )
        return q.sum(), k_cache, v_cache

    k_cache, v_cache = args["k_cache"], args["v_cache"]
    _, got_k, got_v = step(*args.values())
    assert k_cache.is_deleted() and v_cache.is_deleted()  # donated: the new caches reuse their buffers
    np.testing.assert_array_equal(_bits(got_v), _bits(want[2]))
    np.testing.assert_allclose(np.asarray(got_k, np.float32), np.asarray(want[1], np.float32), atol=0.1)  # NaN == NaN


def test_input_checks():
    args = _case(3, 4, 2, 64, jnp.bfloat16)
    call = functools.partial(qk_norm_rope_store, theta=THETA, eps=EPS)
    with pytest.raises(ValueError, match="positions"):
        call(**args | dict(positions=args["positions"].astype(jnp.float32)))
    with pytest.raises(ValueError, match="slot_mapping"):
        call(**args | dict(slot_mapping=args["slot_mapping"][:2]))
    with pytest.raises(ValueError, match="qkv must be"):
        call(**args | dict(qkv=args["qkv"][:, :-64]))  # 3 q heads for 2 kv heads
    with pytest.raises(ValueError, match="qkv must be"):
        call(**args | dict(qkv=args["qkv"][:, :-1]))  # not whole heads
    with pytest.raises(ValueError, match="qkv must be"):
        call(**args | dict(qkv=args["qkv"][:2]))  # 2 tokens, 3 positions
    with pytest.raises(ValueError, match="qkv must be"):
        call(**args | dict(qkv=args["qkv"][:, : 4 * 64]))  # no q head
    with pytest.raises(ValueError, match="qkv dtype"):
        call(**args | dict(qkv=args["qkv"].astype(jnp.float32)))
    with pytest.raises(ValueError, match="k_norm weight"):
        call(**args | dict(k_norm=args["k_norm"][:32]))
    with pytest.raises(ValueError, match="q_norm weight"):
        call(**args | dict(q_norm=args["q_norm"].astype(jnp.float32)))
    with pytest.raises(ValueError, match="must match"):
        call(**args | dict(v_cache=args["v_cache"].astype(jnp.float32)))
    with pytest.raises(ValueError, match="rows_per_program"):
        call(**args, rows_per_program=(3, 2), interpret=True)
    with pytest.raises(ValueError, match="num_warps"):
        call(**args, num_warps=3, interpret=True)
    odd = _case(3, 4, 2, 48, jnp.bfloat16)
    with pytest.raises(ValueError, match="power of two"):
        call(**odd, interpret=True)


def test_fp8_input_checks():
    args = _fp8_case(3, 4, 2, 64, jnp.bfloat16)
    call = functools.partial(qk_norm_rope_store_fp8, theta=THETA, eps=EPS)
    with pytest.raises(ValueError, match="uint8"):
        call(**args | dict(k_cache=args["k_cache"].astype(jnp.bfloat16), v_cache=args["v_cache"].astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="k_scale"):
        call(**args | dict(k_scale=args["k_scale"][:, :, :8]))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        call(**args | dict(qkv=args["qkv"].astype(jnp.float16)))
    with pytest.raises(ValueError, match="q_norm weight"):
        call(**args | dict(q_norm=args["q_norm"].astype(jnp.float32)))
    with pytest.raises(ValueError, match="qkv must be"):
        call(**args | dict(qkv=args["qkv"][:, :-64]))
    with pytest.raises(ValueError, match="qk_norm_rope_store_fp8"):  # fp8 pages passed to the bf16 entry
        qk_norm_rope_store(
            args["k_cache"],
            args["v_cache"],
            *(args[n] for n in ("qkv", "positions", "slot_mapping", "q_norm", "k_norm")),
            theta=THETA,
            eps=EPS,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("rows_per_program", [(1, 1), (4, 2), (8, 4), (16, 8)])
def test_gpu_qwen3_0_6b_shapes(rows_per_program):
    """Qwen3-0.6B per layer (16 q heads, 8 kv heads, head dim 128, bf16), pages of 256, a 256-token step."""
    args = _case(256, 16, 8, 128, jnp.bfloat16, block_size=256, num_pages=8, seed=3)
    _check_against_reference(args, jnp.bfloat16, rows_per_program=rows_per_program)


@pytest.mark.gpu
def test_gpu_qwen3_14b_heads_prefill():
    """Qwen3-14B's heads (40 q, 8 kv), 1500 tokens in the default blocks, and in blocks of 16 q heads (the last
    one part masked)."""
    args = _case(1500, 40, 8, 128, jnp.bfloat16, block_size=256, num_pages=8, seed=4)
    _check_against_reference(args, jnp.bfloat16)
    args = _case(100, 40, 8, 128, jnp.bfloat16, block_size=256, num_pages=8, seed=5)
    _check_against_reference(args, jnp.bfloat16, rows_per_program=(16, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows_per_program", [(1, 1), (4, 2), (8, 4)])
def test_gpu_fp8_qwen3_0_6b_shapes(dtype, rows_per_program):
    """The fp8 kernel compiled at Qwen3-0.6B's shapes, pages of 256, a 256-token step."""
    args = _fp8_case(256, 16, 8, 128, dtype, block_size=256, num_pages=8, seed=3)
    _check_fp8_against_reference(args, dtype, rows_per_program=rows_per_program)
