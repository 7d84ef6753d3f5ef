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


def apply_rope(x, positions, theta: float):
    """x [T, n, H], positions [T] int32 -> x rotated, in x's dtype (angles in float32)."""
    half = x.shape[-1] // 2
    inv_freq = rope_inv_freq(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles)[:, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
