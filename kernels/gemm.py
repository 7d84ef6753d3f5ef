"""Decode GEMMs: x [M, K] @ w [K, N] for 16-512 rows, where the time is reading the weights.

A decode step multiplies a few activation rows by each weight matrix once, so each GEMM should stream its
weights at the device's bandwidth; XLA's GEMMs stay far below it at these shapes (BENCHMARKS.md). The kernel tiles
the output over (row tiles, column tiles) and K over `split_k` programs, enough programs to fill the GPU:
- `matmul` (one K split) returns the product in x's dtype;
- `matmul_partials` may split K and returns the partial sums [S, M, N] (float32 when S > 1; S = 1: x's
  dtype), which the consumer adds: the residual norm (`norms.add_rms_norm`) takes them as its input, and
  `sum_partials` adds them where an XLA fusion follows (it fuses the sum);
- `matmul_silu_mul` is the MLP's gate/up projection with its activation: w holds [gate | up] columns and
  each program multiplies x by a tile of gate columns and the matching tile of up columns, then writes
  silu(gate) * up [M, N / 2] (float32 accumulators, rounded once), so gate and up are never written.

Triton lowering of Pallas, bfloat16 and float16. M must be a multiple of 16 (the smallest dot of the
Triton lowering; the engine's decode buckets are) and at most `MAX_ROWS`; other shapes, float32 (which
must keep the caller's matmul precision) and the CPU run the jnp reference, XLA's dot.
"""

import functools
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._checks import MIN_ROWS

DTYPES = (jnp.bfloat16, jnp.float16)
ROW_MULTIPLE = MIN_ROWS  # rows come in whole smallest dots
MAX_ROWS = 512  # above this a GEMM is a prefill's: the tilings were chosen and measured for decode sizes only
MIN_PROGRAMS = 96  # split K until the grid has this many programs (chosen on the H200's 132 SMs: BENCHMARKS.md)
MAX_SPLIT_K = 8


@dataclass(frozen=True)
class Tiling:
    """The kernel's static tiles: rows, output columns and K per step of a program, K splits, and
    Triton's warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, m: int, k: int, n: int) -> bool:
        return m % self.block_m == 0 and n % self.block_n == 0 and k % (self.split_k * self.block_k) == 0

    def programs(self, m: int, n: int) -> int:
        return (m // self.block_m) * (n // self.block_n) * self.split_k


def default_tiling(m: int, k: int, n: int, max_split_k: int = 1) -> Tiling:
    """Row tiles of up to 64 rows; 64 columns (128 from 256 rows); K in steps of 128, split (up to
    `max_split_k`) until the grid has `MIN_PROGRAMS` programs; if it still has fewer (a product without
    splits: Qwen3-0.6B's qkv below 128 rows), 32 columns."""
    block_m = next((b for b in (64, 32, 16) if m % b == 0), ROW_MULTIPLE)
    tiling = Tiling(block_m=block_m, block_n=128 if m >= 256 else 64, block_k=128, split_k=1)
    while tiling.programs(m, n) < MIN_PROGRAMS and tiling.split_k < max_split_k:
        wider = replace(tiling, split_k=2 * tiling.split_k)
        if not wider.fits(m, k, n):
            break
        tiling = wider
    narrow = replace(tiling, block_n=32)
    if tiling.programs(m, n) < MIN_PROGRAMS and tiling.block_n > 32 and narrow.fits(m, k, n):
        tiling = narrow
    return tiling


def default_silu_mul_tiling(m: int, k: int, n: int) -> Tiling:
    """The gated kernel's tiles for x [M, K] @ w [K, N = 2I]: `default_tiling`'s for [M, K] @ [K, N] with half
    its columns (the same weight bytes per program) below 128 rows; from 128 rows 64 gate + 64 up columns
    three stages deep, in 128-row tiles with 8 warps where 128 divides M from 256 rows. Measured on the
    H200 (BENCHMARKS.md)."""
    if m < 128:
        full = default_tiling(m, k, n)
        return replace(full, block_n=full.block_n // 2)
    if m >= 256 and m % 128 == 0:
        return Tiling(block_m=128, block_n=64, block_k=128, split_k=1, num_warps=8, num_stages=3)
    return replace(default_tiling(m, k, n), block_n=64, num_stages=3)


def _matmul_kernel(*refs, block_k: int, gated: bool):
    # x [bm, Ks]; w [Ks, bn] (gated: gate and up tiles [K, bn] each); out [1, bm, bn]: this split's partial
    # sums, or the product (one split), or silu(gate) * up (gated).
    x_ref, *w_refs, o_ref = refs
    block_m, block_n = o_ref.shape[-2:]

    def body(i, accs):
        cols = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = x_ref[:, cols]
        return tuple(acc + jnp.dot(x, w[cols, :], preferred_element_type=jnp.float32) for acc, w in zip(accs, w_refs))

    zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in w_refs)
    accs = lax.fori_loop(0, w_refs[0].shape[0] // block_k, body, zeros)
    out = accs[0] * jax.nn.sigmoid(accs[0]) * accs[1] if gated else accs[0]
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "gated", "interpret"))
def _matmul_pallas(x, w, *, tiling: Tiling, gated: bool = False, interpret=False):
    """[S, M, N] partial sums (float32 when S > 1, else x's dtype); gated: [1, M, N / 2], silu(gate) * up,
    with the tiling's block_n output columns per program."""
    (m, k), n, t = x.shape, w.shape[1], tiling
    ks = k // t.split_k
    if gated:
        n //= 2
        up = n // t.block_n  # the up half's first column block
        w_specs = [
            pl.BlockSpec((k, t.block_n), lambda i, j, s: (0, j)),
            pl.BlockSpec((k, t.block_n), lambda i, j, s: (0, up + j)),
        ]
    else:
        w_specs = [pl.BlockSpec((ks, t.block_n), lambda i, j, s: (s, j))]
    return pl.pallas_call(
        functools.partial(_matmul_kernel, block_k=t.block_k, gated=gated),
        grid=(m // t.block_m, n // t.block_n, t.split_k),  # row tiles vary fastest: they share a weight tile
        in_specs=[pl.BlockSpec((t.block_m, ks), lambda i, j, s: (i, s)), *w_specs],
        out_specs=pl.BlockSpec((1, t.block_m, t.block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((t.split_k, m, n), jnp.float32 if t.split_k > 1 else x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        interpret=interpret,
        name="decode_matmul_silu_mul" if gated else "decode_matmul",
    )(x, *([w, w] if gated else [w]))


def matmul_reference(x, w):
    """x @ w by XLA, in x's dtype (the caller's matmul precision applies)."""
    return jnp.dot(x, w)


def matmul_silu_mul_reference(x, w):
    """The model's MLP activation op by op: gate, up = split(x @ w) in x's dtype; silu(gate) * up."""
    gate, up = jnp.split(jnp.dot(x, w), 2, axis=-1)
    return jax.nn.silu(gate) * up


def _check(x, w, tiling):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"need x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must have one dtype, got {x.dtype} and {w.dtype}")
    if tiling is not None and not tiling.fits(x.shape[0], x.shape[1], w.shape[1]):
        raise ValueError(f"{tiling} does not tile x {x.shape} @ w {w.shape}")


def _kernel_tiling(x, w, tiling, max_split_k, interpret):
    """The tiling to run the kernel with (the caller's, else the default), or None where the reference runs:
    on the CPU (unless `interpret`), for float32, and for shapes the default tiling does not take."""
    (m, k), n = x.shape, w.shape[1]
    if not (interpret or jax.default_backend() != "cpu") or x.dtype not in DTYPES:
        return None
    if tiling is not None:
        return tiling
    if m % ROW_MULTIPLE or m > MAX_ROWS:
        return None
    tiling = default_tiling(m, k, n, max_split_k)
    return tiling if tiling.fits(m, k, n) else None


def matmul(x, w, *, tiling: Tiling | None = None, interpret=False):
    """Public entry: x [M, K] @ w [K, N] -> [M, N] in x's dtype (float32 accumulation).

    tiling: the kernel's tiles, its split_k 1 (`default_tiling` if None). interpret: run the Pallas
    kernel in interpret mode (tests on the CPU). Otherwise the CPU, float32 and shapes outside the
    kernel's (see the module docstring) run `matmul_reference`; a GPU the kernel.
    """
    _check(x, w, tiling)
    if tiling is not None and tiling.split_k != 1:
        raise ValueError(f"matmul returns the product: its tiling needs split_k 1, got {tiling.split_k}")
    tiling = _kernel_tiling(x, w, tiling, 1, interpret)
    return matmul_reference(x, w) if tiling is None else _matmul_pallas(x, w, tiling=tiling, interpret=interpret)[0]


def matmul_partials(x, w, *, tiling: Tiling | None = None, interpret=False):
    """Public entry: x [M, K] @ w [K, N] as partial sums [S, M, N] over S slices of K.

    S is the tiling's split_k (`default_tiling` with up to `MAX_SPLIT_K` splits if None; 1 where the
    reference runs). S > 1: float32; S == 1: x's dtype. Their sum over the first axis, rounded to x's dtype
    (`sum_partials`), is the product. Arguments as in `matmul`.
    """
    _check(x, w, tiling)
    tiling = _kernel_tiling(x, w, tiling, MAX_SPLIT_K, interpret)
    return matmul_reference(x, w)[None] if tiling is None else _matmul_pallas(x, w, tiling=tiling, interpret=interpret)


def matmul_silu_mul(x, w, *, tiling: Tiling | None = None, interpret=False):
    """Public entry: the MLP's gated activation of x [M, K] @ w [K, 2I] ([gate | up] columns): silu(x @ gate) *
    (x @ up) -> [M, I] in x's dtype. One program computes a tile of block_n gate and block_n up columns
    (`default_silu_mul_tiling`); no K split. Arguments as in `matmul`; the reference is `matmul_silu_mul_reference`.
    """
    _check(x, w, tiling)
    (m, k), n = x.shape, w.shape[1]
    if n % 2:
        raise ValueError(f"w must hold [gate | up] columns (an even count), got {w.shape}")
    if tiling is not None and (tiling.split_k != 1 or not tiling.fits(m, k, n // 2)):
        raise ValueError(f"{tiling} does not tile the gated product: split_k 1 and block_n dividing {n // 2}")
    if tiling is None:
        full = _kernel_tiling(x, w, None, 1, interpret)  # None where the reference runs
        tiling = None if full is None else default_silu_mul_tiling(m, k, n)
        tiling = tiling if tiling is not None and tiling.fits(m, k, n // 2) else None
    else:
        tiling = _kernel_tiling(x, w, tiling, 1, interpret)
    if tiling is None:
        return matmul_silu_mul_reference(x, w)
    return _matmul_pallas(x, w, tiling=tiling, gated=True, interpret=interpret)[0]


def sum_partials(partials, dtype):
    """[S, ..., N] partial sums -> their sum [..., N] in `dtype` (float32 adds; one partial: a cast)."""
    if partials.shape[0] == 1:
        return partials[0].astype(dtype)
    return jnp.sum(partials.astype(jnp.float32), axis=0).astype(dtype)
