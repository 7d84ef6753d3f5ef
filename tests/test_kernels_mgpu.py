"""The Mosaic GPU prefill attention kernel against the jnp reference.

CPU: the work list's invariants, and (slow) a few cases through the Mosaic GPU interpreter, which runs
the kernel's pipeline, barriers, masks and row-exact stores (with plain dots in place of wgmma). GPU:
the compiled kernel on ragged batches (1, P-1, P, P+1 new tokens, cached prefixes, empty sequences,
padded rows), permuted block tables, NaN in every slot no sequence owns, GQA groups 1-8, head_dim 64
and 128, the Qwen3-0.6B heads, and a cache past 4 GiB.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nanovllm_jax.kernels import paged_prefill_attention_reference
from nanovllm_jax.kernels import prefill_attention_mgpu as mgpu
from test_kernels import _caches_over_4gib, _paged_cache, _tables  # pytest puts tests/ on sys.path

TOL = 2e-2  # max |out - ref| / max |ref| for bf16 / f16


def _inputs(q_lens, prefix_lens, q_heads, kv_heads, head_dim, block_size, dtype, width, pad=0, seed=0):
    rng = np.random.default_rng(seed)
    batch = len(q_lens)
    context_lens = [a + b for a, b in zip(q_lens, prefix_lens, strict=True)]
    num_pages = batch * width + 2
    tables = _tables(rng, batch, width, num_pages)
    k_cache, v_cache = _paged_cache(rng, num_pages, kv_heads, block_size, head_dim, dtype, tables, context_lens)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + pad, q_heads, head_dim)), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return q, k_cache, v_cache, jnp.asarray(tables), cu, jnp.asarray(context_lens, jnp.int32)


def _check(out, args, n_real):
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    ref = np.asarray(paged_prefill_attention_reference(*args), np.float32)
    assert not np.isnan(out).any(), "NaN in the kernel output"
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < TOL, f"relative error {err:.2e}"
    np.testing.assert_array_equal(out[n_real:], 0.0)  # padded rows of the packed batch


# ------------------------------------------------------------------------------------------- work list


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_work_list_covers_every_row_once(group):
    """Each (token, kv head) row is in exactly one item; copies stay aligned and inside the batch."""
    q_lens = [1, 63, 64, 65, 0, 700, 5, 128]
    prefix = [0, 0, 64, 3, 0, 100, 200, 0]
    kv_heads, tile, pad, programs = 2, 128 // group, 14, 7  # 1026 + 14 rows: the wrapper pads to 8s
    t = sum(q_lens) + pad
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    ctx = jnp.asarray([a + b for a, b in zip(q_lens, prefix, strict=True)], jnp.int32)
    work, bounds = mgpu._work_list(cu, ctx, t, tile, kv_heads, 128, programs)
    work, bounds = np.asarray(work), np.asarray(bounds)
    used = int(bounds[-1])
    assert bounds[0] == 0 and np.all(np.diff(bounds) >= 0)
    assert np.all(work[used:] == 0) and np.all(work[:used, 2] > 0)
    covered = np.zeros((t, kv_heads), int)
    for seq, t_load, n, d, pos0, kv_end, c, head in work[:used]:
        assert 0 <= t_load and t_load % 8 == 0 and t_load + tile <= t  # aligned copies inside the batch
        assert d >= 0 and d + n <= tile
        covered[t_load + d : t_load + d + n, head] += 1
        tail = t_load + d >= sum(q_lens)
        assert kv_end == (0 if tail else pos0 + n) and kv_end <= (0 if tail else c)
        if not tail:
            start = int(cu[seq])
            assert t_load + d >= start and t_load + d + n <= start + q_lens[seq]
            assert pos0 == ctx[seq] - q_lens[seq] + (t_load + d - start)
    np.testing.assert_array_equal(covered, 1)  # every row, padding included, in exactly one tile


# ------------------------------------------------------------------------- CPU: Mosaic GPU interpreter


def _interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # a JAX without the (private) interpreter
        pytest.skip("no Mosaic GPU interpreter in this JAX")
    return InterpretGPUParams()


@pytest.mark.slow
@pytest.mark.parametrize(
    "q_lens,prefix,q_heads,head_dim,block_size,width,block_kv,num_stages",
    [
        ([1, 63, 64, 65, 0, 130, 7], [0, 0, 64, 3, 0, 100, 200], 4, 64, 64, 6, 64, 2),  # G=2
        ([1, 127, 128, 129, 0, 40], [0, 0, 128, 3, 0, 300], 2, 64, 128, 4, 128, 2),  # G=1
        ([1, 31, 32, 33, 0, 100], [0, 0, 64, 3, 0, 130], 8, 64, 64, 4, 64, 3),  # G=4
    ],
)
def test_interpret(q_lens, prefix, q_heads, head_dim, block_size, width, block_kv, num_stages):
    if jax.default_backend() == "gpu":
        pytest.skip("the GPU runs the compiled kernel")
    params = _interpret_params()
    args = _inputs(q_lens, prefix, q_heads, 2, head_dim, block_size, jnp.bfloat16, width, pad=5)
    out = mgpu._prefill_mgpu(
        *args,
        scale=head_dim**-0.5,
        block_kv=block_kv,
        num_stages=num_stages,
        num_programs=3,
        use_schedule_barrier=True,
        interpret=params,
    )
    _check(out, args, sum(q_lens))


def test_supports_and_checks():
    cache = jnp.zeros((4, 2, 64, 64), jnp.bfloat16)
    q = jnp.zeros((5, 4, 64), jnp.bfloat16)
    if jax.default_backend() != "gpu":
        assert not mgpu.supports_mgpu(q, cache)
    else:
        assert mgpu.supports_mgpu(q, cache)
        assert not mgpu.supports_mgpu(q.astype(jnp.float32), cache.astype(jnp.float32))
        assert not mgpu.supports_mgpu(jnp.zeros((5, 6, 64), jnp.bfloat16), cache)  # group 3
        assert not mgpu.supports_mgpu(q, jnp.zeros((4, 2, 48, 64), jnp.bfloat16))  # page 48
    tables, lens = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="cu_q_lens"):
        mgpu.paged_prefill_attention_mgpu(q, cache, cache, tables, jnp.asarray([0, 2], jnp.int32), lens)


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim", [(1, 128), (2, 128), (4, 64), (8, 128), (2, 64)])
def test_gpu_prefill_mgpu(group, head_dim):
    dtype = jnp.bfloat16
    q_lens, prefix = [1, 255, 256, 257, 700, 0, 40], [0, 0, 256, 3, 100, 0, 1000]
    args = _inputs(q_lens, prefix, 4 * group, 4, head_dim, 256, dtype, width=5, pad=9)
    _check(mgpu.paged_prefill_attention_mgpu(*args), args, sum(q_lens))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "block_kv,num_stages,sched", [(64, 3, False), (64, 3, True), (64, 4, False), (128, 2, True), (128, 2, False)]
)
def test_gpu_prefill_mgpu_qwen_tunings(block_kv, num_stages, sched):
    """Qwen3-0.6B heads, pages of 256: prompts of 512+ tokens, some with cached prefixes, short ones."""
    rng = np.random.default_rng(3)
    q_lens = [int(x) for x in rng.integers(512, 640, 6)] + [1, 63, 64, 65, 129]
    prefix = [0, 0, 300, 0, 17, 0, 0, 0, 256, 1, 2000]
    args = _inputs(q_lens, prefix, 16, 8, 128, 256, jnp.bfloat16, width=10, pad=30, seed=4)
    out = mgpu.paged_prefill_attention_mgpu(*args, block_kv=block_kv, num_stages=num_stages, use_schedule_barrier=sched)
    _check(out, args, sum(q_lens))
    again = mgpu.paged_prefill_attention_mgpu(
        *args, block_kv=block_kv, num_stages=num_stages, use_schedule_barrier=sched
    )
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))  # no race: bit-identical reruns


@pytest.mark.gpu
@pytest.mark.parametrize("num_programs", [1, 5, 300])
def test_gpu_prefill_mgpu_programs(num_programs):
    """Fewer programs than SMs (many items each) and more programs than items (idle programs)."""
    args = _inputs([300, 5, 129], [0, 70, 0], 16, 8, 128, 256, jnp.bfloat16, width=2, pad=3, seed=5)
    _check(mgpu.paged_prefill_attention_mgpu(*args, num_programs=num_programs), args, 434)


@pytest.mark.gpu
def test_gpu_prefill_mgpu_tiny_batch():
    args = _inputs([3], [0], 16, 8, 128, 256, jnp.bfloat16, width=1)  # fewer tokens than a tile
    _check(mgpu.paged_prefill_attention_mgpu(*args), args, 3)


@pytest.mark.gpu
def test_gpu_prefill_mgpu_cache_over_4gib():
    """Pages past 2**31 elements: the TMA coordinates must reach them."""
    num_pages, k_cache, v_cache = _caches_over_4gib()
    tables = jnp.asarray([[num_pages - 2, num_pages - 1]], jnp.int32)
    cu, lens = jnp.asarray([0, 300], jnp.int32), jnp.asarray([400], jnp.int32)
    q = jax.random.normal(jax.random.key(4), (300, 16, 128), jnp.bfloat16)
    out = mgpu.paged_prefill_attention_mgpu(q, k_cache, v_cache, tables, cu, lens)
    small = (q, k_cache[-2:], v_cache[-2:], jnp.asarray([[0, 1]], jnp.int32), cu, lens)
    _check(out, small, 300)
