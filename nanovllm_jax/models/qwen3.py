"""The Qwen3 causal LM as a Flax NNX module (Qwen2-style checkpoints too: qkv bias, no q/k norm).

The projections run the decode GEMMs of `kernels.gemm` (XLA's dot where they do not apply): the MLP's
gate/up with its activation in one kernel; qkv with the q/k norms, RoPE and the KV store in its epilogue
(`kernels.matmul_qk_norm_rope_store`); the row-parallel ones (o and down) return split-K partial sums,
which the residual norm after them adds (`_row_parallel`).

Written for tensor parallelism from the start: the module is built with the *per-shard* sizes of
`ModelArgs.for_shard`, and `tp_axis` names the mesh axis to all-reduce over (None on one device).
Under `shard_map` each device runs exactly this single-device math on its slice: q/k/v and gate/up are
fused column-parallel projections (per shard: [q | k | v] and [gate | up]), o and down are row-parallel
(one psum each), the embedding and LM head are vocab-parallel.

Axes: T tokens, D model, N q heads, K kv heads, H head dim, I intermediate, V vocab.
"""

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from flax import nnx

from nanovllm_jax import kernels
from nanovllm_jax.layers.attention import (
    AttentionMetadata,
    attend,
    paged_attention,
    project_qk_norm_rope_store,
    qk_norm_rope_store,
)
from nanovllm_jax.layers.rotary import apply_rope, rope_theta


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: jnp.dtype
    tp_size: int = 1  # the shard sizes below are per device when tp_size > 1

    @classmethod
    def from_hf(cls, hf_config, dtype=None) -> "ModelArgs":
        model_type = getattr(hf_config, "model_type", "qwen3")
        if model_type not in ("qwen3", "qwen2"):
            raise ValueError(f"model_type {model_type!r} is not supported; nanovllm-jax runs Qwen3 (and Qwen2)")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if dtype is None:
            dtype = checkpoint_dtype(hf_config)
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=hf_config.intermediate_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=rope_theta(hf_config),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            dtype=jnp.dtype(dtype),
        )

    def check_tp(self, tp: int):
        """Raise ValueError unless `tp` devices can split this model's heads and MLP."""
        if self.num_heads % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide the {self.num_heads} attention heads; "
                f"use one of {[d for d in range(1, 9) if self.num_heads % d == 0]}"
            )
        if not (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0):
            raise ValueError(
                f"tensor_parallel_size={tp} and the {self.num_kv_heads} kv heads: one must divide the other"
            )
        if self.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide intermediate_size {self.intermediate_size}")

    def for_shard(self, tp: int) -> "ModelArgs":
        """Per-device sizes under `tp`-way tensor parallelism (kv heads replicated when tp exceeds them)."""
        self.check_tp(tp)
        return replace(
            self,
            num_heads=self.num_heads // tp,
            num_kv_heads=max(self.num_kv_heads // tp, 1),
            intermediate_size=self.intermediate_size // tp,
            vocab_size=-(-self.vocab_size // tp),  # vocab padded up to a multiple of tp
            tp_size=tp,
        )


def checkpoint_dtype(hf_config):
    name = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "bfloat16"
    name = str(name).removeprefix("torch.")
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"checkpoint dtype {name!r} is not supported (bfloat16 or float32)")
    return jnp.dtype(name)


def _param(shape, dtype):
    # Values come from the checkpoint; the module is built abstractly (nnx.eval_shape), so this is a shape.
    return nnx.Param(jnp.zeros(shape, dtype))


def _row_parallel(x, w, tp_axis):
    """x @ w for a row-parallel projection, as split-K partial sums [S, T, D] (`kernels.matmul_partials`)
    that the next residual norm adds; under TP they are added here and all-reduced: [T, D]."""
    partials = kernels.matmul_partials(x, w)
    if tp_axis is None:
        return partials
    return jax.lax.psum(kernels.sum_partials(partials, x.dtype), tp_axis)


class RMSNorm(nnx.Module):
    """`norm(x)` -> RMSNorm(x); `norm(x, residual)` -> (RMSNorm(x + residual), x + residual).

    With a residual, the add and the norm run as one kernel (`kernels.add_rms_norm`; its jnp reference
    on CPU or with impl "reference"). Without one there is no add to fuse: plain jnp, which XLA fuses
    with the neighbouring ops (the first layer's input norm with the embedding lookup).
    """

    def __init__(self, dim: int, eps: float, dtype, impl: str = "auto"):
        self.weight = _param((dim,), dtype)
        self.eps, self.impl = eps, impl

    def __call__(self, x, residual=None):
        """x [..., D], or with a residual also the partial sums [S, ..., D] of a row-parallel projection."""
        if residual is None:
            return kernels.rms_norm_reference(x, self.weight[...], self.eps)
        add_norm = kernels.add_rms_norm_reference if self.impl == "reference" else kernels.add_rms_norm
        return add_norm(x, residual, self.weight[...], self.eps)


class Qwen3Attention(nnx.Module):
    def __init__(self, a: ModelArgs, tp_axis: str | None, attn_impl: str):
        self.n, self.k, self.h = a.num_heads, a.num_kv_heads, a.head_dim
        self.qkv = _param((a.hidden_size, (self.n + 2 * self.k) * self.h), a.dtype)  # [D, (N+2K)H]
        self.qkv_bias = _param(((self.n + 2 * self.k) * self.h,), a.dtype) if a.qkv_bias else None
        self.o = _param((self.n * self.h, a.hidden_size), a.dtype)  # [NH, D] row-parallel
        self.q_norm = RMSNorm(self.h, a.rms_norm_eps, a.dtype) if a.qk_norm else None
        self.k_norm = RMSNorm(self.h, a.rms_norm_eps, a.dtype) if a.qk_norm else None
        self.theta, self.eps, self.tp_axis, self.attn_impl = a.rope_theta, a.rms_norm_eps, tp_axis, attn_impl

    def __call__(self, x, positions, kv_cache: tuple, md: AttentionMetadata):
        T = x.shape[0]
        rope_kw = dict(theta=self.theta, eps=self.eps, impl=self.attn_impl)
        if self.q_norm is not None and self.qkv_bias is None:
            # One kernel from x to attention's inputs where it applies (a decode step): the qkv projection,
            # q/k norms, RoPE, and k/v stored in the cache.
            q_norm, k_norm = self.q_norm.weight[...], self.k_norm.weight[...]
            q, kv_cache = project_qk_norm_rope_store(
                x, self.qkv[...], positions, q_norm, k_norm, kv_cache, md, **rope_kw
            )
            o = attend(q, kv_cache, md, self.attn_impl)
        else:
            qkv = kernels.matmul(x, self.qkv[...])
            if self.qkv_bias is not None:
                qkv = qkv + self.qkv_bias[...]
            if self.q_norm is not None:  # a qkv bias: the projection apart, then one kernel for the rest
                q_norm, k_norm = self.q_norm.weight[...], self.k_norm.weight[...]
                q, kv_cache = qk_norm_rope_store(qkv, positions, q_norm, k_norm, kv_cache, md, **rope_kw)
                o = attend(q, kv_cache, md, self.attn_impl)
            else:  # checkpoints without q/k norm (Qwen2): RoPE and the store op by op
                q, k, v = jnp.split(qkv, [self.n * self.h, (self.n + self.k) * self.h], axis=-1)
                q, k, v = q.reshape(T, self.n, self.h), k.reshape(T, self.k, self.h), v.reshape(T, self.k, self.h)
                q, k = apply_rope(q, positions, self.theta), apply_rope(k, positions, self.theta)
                o, kv_cache = paged_attention(q, k, v, kv_cache, md, self.attn_impl)
        return _row_parallel(o.reshape(T, self.n * self.h), self.o[...], self.tp_axis), kv_cache


class Qwen3MLP(nnx.Module):
    def __init__(self, a: ModelArgs, tp_axis: str | None):
        self.gate_up = _param((a.hidden_size, 2 * a.intermediate_size), a.dtype)  # [D, 2I] column-parallel
        self.down = _param((a.intermediate_size, a.hidden_size), a.dtype)  # [I, D] row-parallel
        self.tp_axis = tp_axis

    def __call__(self, x):
        h = kernels.matmul_silu_mul(x, self.gate_up[...])  # [T, I] silu(gate) * up
        return _row_parallel(h, self.down[...], self.tp_axis)


class Qwen3DecoderLayer(nnx.Module):
    """Fused residual (as vLLM's Qwen3): each residual add is done by the norm after it.

    Takes and returns (x, residual): x is the last sublayer's output (layer 0: the embeddings, and no
    residual yet), residual the stream before it; the next layer's input norm (or the final norm) adds
    them. The same sums in the same order as the plain `x = x + h` (an IEEE add commutes).
    """

    def __init__(self, a: ModelArgs, tp_axis: str | None, attn_impl: str):
        self.input_norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.dtype, attn_impl)
        self.attn = Qwen3Attention(a, tp_axis, attn_impl)
        self.post_attn_norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.dtype, attn_impl)
        self.mlp = Qwen3MLP(a, tp_axis)

    def __call__(self, x, residual, positions, kv_cache: tuple, md):
        if residual is None:
            x, residual = self.input_norm(x), x
        else:
            x, residual = self.input_norm(x, residual)
        h, kv_cache = self.attn(x, positions, kv_cache, md)
        x, residual = self.post_attn_norm(h, residual)
        return self.mlp(x), residual, kv_cache


class Qwen3ForCausalLM(nnx.Module):
    """`__call__` returns final hidden states and the updated caches; `compute_logits` applies the head.

    The runner picks the rows that need logits (the last token of each sequence) before the LM head,
    so a prefill never materialises [T, V] logits.
    """

    def __init__(self, a: ModelArgs, tp_axis: str | None = None, attn_impl: str = "auto"):
        self.args, self.tp_axis = a, tp_axis
        self.embed = _param((a.vocab_size, a.hidden_size), a.dtype)  # [V, D] vocab-parallel
        self.layers = nnx.List([Qwen3DecoderLayer(a, tp_axis, attn_impl) for _ in range(a.num_layers)])
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.dtype, attn_impl)
        self.lm_head = None if a.tie_word_embeddings else _param((a.hidden_size, a.vocab_size), a.dtype)  # [D, V]

    def __call__(self, input_ids, positions, kv_caches, md: AttentionMetadata):
        """input_ids, positions [T] int32; kv_caches: a list with one cache tuple per layer.

        Each layer's cache is opaque here: `(k_cache, v_cache)` or fp8's `(k_cache, v_cache, k_scale,
        v_scale)` (`kernels.kv_cache_shapes`); the attention layer reads the layout from it. Returns the
        hidden states and the list of updated cache tuples (same structure).
        """
        x, residual = self._embed(input_ids), None
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual, kv_cache = layer(x, residual, positions, tuple(kv_cache), md)
            new_caches.append(kv_cache)
        return self.norm(x, residual)[0], new_caches

    def _embed(self, ids):
        table = self.embed[...]
        if self.tp_axis is None:
            return table[ids]
        # Vocab-parallel: each shard looks up the ids in its row range, zeros elsewhere, then one psum.
        local = ids - jax.lax.axis_index(self.tp_axis) * table.shape[0]
        hit = (local >= 0) & (local < table.shape[0])
        x = jnp.where(hit[:, None], table[jnp.where(hit, local, 0)], 0)
        return jax.lax.psum(x, self.tp_axis)

    def compute_logits(self, x):
        """x [B, D] -> float32 logits [B, V] (per shard: this shard's vocab slice)."""
        if self.lm_head is None:
            return jnp.einsum("BD,VD->BV", x, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("BD,DV->BV", x, self.lm_head[...], preferred_element_type=jnp.float32)
