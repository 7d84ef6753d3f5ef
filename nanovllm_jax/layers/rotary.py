"""Rotary position embedding (RoPE, the rotate-half form Qwen3 uses), computed from positions on the fly."""

import jax.numpy as jnp


def rope_theta(hf_config) -> float:
    """RoPE base from either config style: `rope_parameters` (newer) or top-level `rope_theta` (older)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in ("default", None):
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only the default RoPE of Qwen3)")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def rope_inv_freq(head_dim: int, theta: float):
    """[H/2] float32 RoPE frequencies (the fused kernel takes the same values as an operand)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """positions [T] int32 -> (cos, sin) [T, H/2] of the float32 angles, in `dtype` (what `apply_rope` rotates
    by; the qkv projection's fused epilogue takes them as operands)."""
    angles = positions.astype(jnp.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, positions, theta: float):
    """x [T, n, H], positions [T] int32 -> x rotated, in x's dtype (angles in float32)."""
    half = x.shape[-1] // 2
    cos, sin = (a[:, None, :] for a in rope_cos_sin(positions, x.shape[-1], theta, x.dtype))
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
