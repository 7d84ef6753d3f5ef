"""RMSNorm, optionally fused with the residual add before it: `add_rms_norm` and `rms_norm`.

In a decoder layer each residual add is followed by an RMSNorm; XLA runs the two as separate kernels,
twice per layer, and a small decode step is bound by kernel launches. `add_rms_norm(x, residual)`
returns (RMSNorm(x + residual), x + residual) from one kernel; `rms_norm` is the same kernel without the
residual (one kernel, a static flag). `x` may also be split-K partial sums [S, ..., D] of the sublayer's
output (`gemm.matmul_partials`): the kernel adds them in float32 and rounds to the model dtype before the
residual add, so the GEMM needs no reduction kernel of its own. The math is the model's: the sum in the
model dtype, the mean of squares in float32, `rsqrt(mean + eps)`, the normed row cast to the model dtype,
then times the weight (in the model dtype); the jnp references are exactly the model's old code, what the
CPU runs.

Backends (`backend=`): "triton" (the default) is the Triton lowering of Pallas, one program per row (a
decode step has 1-1024 rows of 1-5k values: a row is a few KB, and each row's reduction stays inside its
program, so a NaN row touches no other). Triton blocks are powers of two: a hidden size that is not one
(Qwen3-14B: 5120) is padded to the next in registers, with masked loads (zeros) and masked stores.
"mosaic" is the same kernel on Pallas' Mosaic GPU lowering (Hopper): one warpgroup per row, the row
copied to shared memory by TMA and back; hidden sizes that are multiples of 128 only.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .gemm import sum_partials

try:  # Mosaic GPU's Pallas module imports on CPU builds too; guarded so that the package never fails.
    from jax.experimental.pallas import mosaic_gpu as plmgpu
except ImportError:  # pragma: no cover
    plmgpu = None

DTYPES = (jnp.bfloat16, jnp.float32)


def _norm_kernel(*refs, eps: float, has_residual: bool, num_partials: int):
    # x [D] this row (num_partials: [S, D], its partial sums); residual [D] this row (has_residual); weight
    # [D]; out [D] this row; new_residual [D] this row (has_residual). D need not be a power of two: the row
    # is read as a padded block.
    if has_residual:
        x_ref, res_ref, w_ref, o_ref, new_res_ref = refs
    else:
        (x_ref, w_ref, o_ref), res_ref, new_res_ref = refs, None, None
    d = x_ref.shape[-1]
    block = pl.next_power_of_2(d)
    cols = jnp.arange(block)
    mask = None if block == d else cols < d

    def load(ref, *lead):  # lead: the partial's index
        idx = ref.at[(*lead, cols)]
        return plgpu.load(idx) if mask is None else plgpu.load(idx, mask=mask, other=0)

    def store(ref, val):
        plgpu.store(ref.at[cols], val, mask=mask)

    if num_partials:
        x = sum(load(x_ref, p).astype(jnp.float32) for p in range(num_partials)).astype(o_ref.dtype)
    else:
        x = load(x_ref)
    if has_residual:
        x = x + load(res_ref)  # in the model dtype, as the model's `x + h`
        store(new_res_ref, x)
    x32 = x.astype(jnp.float32)
    mean_sq = jnp.sum(x32 * x32) / d  # padded columns hold 0: they add nothing
    normed = (x32 * lax.rsqrt(mean_sq + eps)).astype(x.dtype)
    store(o_ref, load(w_ref) * normed)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _norm_pallas(x, residual, weight, *, eps, interpret=False):
    has_residual = residual is not None
    num_partials = x.shape[0] if has_residual and x.ndim > residual.ndim else 0
    shape, d, dtype = x.shape[1:] if num_partials else x.shape, x.shape[-1], weight.dtype
    row = pl.BlockSpec((None, d), lambda i: (i, 0))  # [R, D] -> this row [D]
    if num_partials:
        x, x_spec = x.reshape(num_partials, -1, d), pl.BlockSpec((num_partials, None, d), lambda i: (0, i, 0))
    else:
        x, x_spec = x.reshape(-1, d), row
    rows = x.shape[-2]
    args = (x, residual.reshape(-1, d), weight) if has_residual else (x, weight)
    out_shape = [jax.ShapeDtypeStruct((rows, d), dtype)] * (2 if has_residual else 1)
    block = pl.next_power_of_2(d)
    outs = pl.pallas_call(
        functools.partial(_norm_kernel, eps=eps, has_residual=has_residual, num_partials=num_partials),
        grid=(rows,),
        in_specs=[x_spec] + [row] * (len(args) - 2) + [pl.BlockSpec((d,), lambda i: (0,))],  # x, residual; weight
        out_specs=[row] * len(out_shape),  # normed, new residual
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=min(max(block // 256, 1), 8), num_stages=1),
        interpret=interpret,
        name="add_rms_norm" if has_residual else "rms_norm",
    )(*args)
    return tuple(o.reshape(shape) for o in outs)


# ------------------------------------------------------------------------------------------ Mosaic GPU


def _norm_mgpu_kernel(*refs, eps: float, has_residual: bool):
    # GMEM, whole: x [R, D]; residual [R, D] (has_residual); weight [D]; out [R, D]; new_residual [R, D]
    # (has_residual). One warpgroup per row; D a multiple of 128 (the strided layout of 1-D arrays).
    if has_residual:
        x_gmem, res_gmem, w_gmem, o_gmem, new_res_gmem = refs
    else:
        (x_gmem, w_gmem, o_gmem), res_gmem, new_res_gmem = refs, None, None
    row = lax.axis_index("rows")
    d = x_gmem.shape[1]

    def scoped(landed, x_smem, w_smem, res_smem=None):  # [D] each
        copies = [(x_gmem.at[row], x_smem), (w_gmem, w_smem)]
        if has_residual:
            copies.append((res_gmem.at[row], res_smem))
        for src, dst in copies:  # whole contiguous rows: plain bulk copies (no tensor map, no 256 limit)
            plmgpu.copy_gmem_to_smem(src, dst, landed, oob_mode=plmgpu.OOBFillMode.PROMISE_IN_BOUNDS)
        plmgpu.barrier_wait(landed)
        x = x_smem[...]
        if has_residual:
            x = x + res_smem[...]
            res_smem[...] = x  # each thread rewrites the elements it read: no other thread's
        x32 = x.astype(jnp.float32)
        mean_sq = jnp.sum(x32 * x32) / d
        x_smem[...] = w_smem[...] * (x32 * lax.rsqrt(mean_sq + eps)).astype(x.dtype)
        plmgpu.commit_smem()  # the stores above, visible to the TMA copies out
        plmgpu.copy_smem_to_gmem(x_smem, o_gmem.at[row])
        if has_residual:
            plmgpu.copy_smem_to_gmem(res_smem, new_res_gmem.at[row])
        plmgpu.wait_smem_to_gmem(0)

    rows_smem = [plmgpu.SMEM((d,), x_gmem.dtype)] * (3 if has_residual else 2)
    pl.run_scoped(scoped, plmgpu.Barrier(num_arrivals=len(rows_smem)), *rows_smem)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _norm_mgpu(x, residual, weight, *, eps, interpret=None):
    has_residual = residual is not None
    shape, d = x.shape, x.shape[-1]
    x = x.reshape(-1, d)  # [R, D] rows
    args = (x, residual.reshape(-1, d), weight) if has_residual else (x, weight)
    outs = plmgpu.kernel(
        functools.partial(_norm_mgpu_kernel, eps=eps, has_residual=has_residual),
        out_type=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * (2 if has_residual else 1),  # normed, new residual
        grid=(x.shape[0],),
        grid_names=("rows",),
        interpret=interpret,
    )(*args)
    return tuple(o.reshape(shape) for o in outs)


def _mgpu_interpret_params():
    # JAX's Mosaic GPU interpreter (private in JAX 0.10): runs the Mosaic kernel on the CPU for the tests.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# ------------------------------------------------------------------------------------------------- entries


def rms_norm_reference(x, weight, eps):
    """x [..., D] -> RMSNorm(x) * weight, in x's dtype (the mean of squares in float32)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def add_rms_norm_reference(x, residual, weight, eps):
    """(rms_norm_reference(x + residual), x + residual); the sum in residual's dtype. x may be partial sums
    [S, ..., D]: their float32 sum rounded to residual's dtype is x."""
    if x.ndim > residual.ndim:
        x = sum_partials(x, residual.dtype)
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps), new_residual


def _check(x, residual, weight, backend):
    if backend not in ("triton", "mosaic"):
        raise ValueError(f"backend must be 'triton' or 'mosaic', got {backend!r}")
    shape, dtype = x.shape, x.dtype  # of the sublayer's output
    if residual is not None and x.ndim == residual.ndim + 1:  # partial sums [S, ..., D]
        if x.shape[1:] != residual.shape or x.dtype not in (jnp.float32, residual.dtype):
            raise ValueError(
                f"partial sums must be [S, *{residual.shape}] in float32 or {residual.dtype}, got {x.dtype} {x.shape}"
            )
        if backend == "mosaic":
            raise ValueError("the Mosaic GPU kernel takes no partial sums; use backend='triton'")
        shape, dtype = residual.shape, residual.dtype
    if len(shape) < 1 or dtype not in DTYPES:
        raise ValueError(f"x must be a bfloat16 or float32 array [..., D], got {dtype} {shape}")
    if residual is not None and (residual.shape != shape or residual.dtype != dtype):
        raise ValueError(f"residual must match x ({dtype} {shape}), got {residual.dtype} {residual.shape}")
    if weight.shape != shape[-1:] or weight.dtype != dtype:
        raise ValueError(f"weight must be {dtype} {shape[-1:]}, got {weight.dtype} {weight.shape}")
    if backend == "mosaic" and (plmgpu is None or shape[-1] % 128):
        raise ValueError(f"the Mosaic GPU kernel needs a hidden size that is a multiple of 128, got {shape[-1]}")


def _norm(x, residual, weight, eps, backend, interpret):
    """The kernel of `backend` on a GPU or in interpret mode, else None (the caller runs the reference)."""
    if x.size == 0 or not (interpret or jax.default_backend() != "cpu"):
        return None
    if backend == "mosaic":
        interpret = _mgpu_interpret_params() if interpret else None
        return _norm_mgpu(x, residual, weight, eps=float(eps), interpret=interpret)
    return _norm_pallas(x, residual, weight, eps=float(eps), interpret=interpret)


def add_rms_norm(x, residual, weight, eps, *, backend="triton", interpret=False):
    """Public entry: the residual add and the RMSNorm after it, in one kernel.

    Args:
      x, residual: [..., D] in the same dtype (bfloat16 or float32); D any size. x may instead be partial
        sums [S, ..., D] (float32, or residual's dtype) whose sum is the sublayer's output.
      weight: [D] the norm's scale, in x's dtype.
      eps: the norm's epsilon (a Python float).
      backend: "triton" or "mosaic" (Mosaic GPU, Hopper; D a multiple of 128), see the module docstring.
      interpret: run the Pallas kernel in interpret mode (tests on the CPU; "mosaic": JAX's Mosaic GPU
        interpreter). Otherwise the CPU runs the jnp reference and a GPU the kernel.
    Returns:
      (normed, new_residual), both like x: new_residual = x + residual, normed = RMSNorm(new_residual).
    """
    _check(x, residual, weight, backend)
    out = _norm(x, residual, weight, eps, backend, interpret)
    return add_rms_norm_reference(x, residual, weight, eps) if out is None else out


def rms_norm(x, weight, eps, *, backend="triton", interpret=False):
    """Public entry: RMSNorm(x) * weight (no residual), the same kernel; arguments as in `add_rms_norm`."""
    _check(x, None, weight, backend)
    out = _norm(x, None, weight, eps, backend, interpret)
    return rms_norm_reference(x, weight, eps) if out is None else out[0]
