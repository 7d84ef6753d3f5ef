"""Hugging Face safetensors -> the NNX model's parameters, streamed shard by shard.

Each parameter is made with `jax.make_array_from_callback`: the callback of a device reads only that
device's slice from the safetensors file (memory-mapped `get_slice`), so neither the host nor any device
ever holds the whole model, and the host holds at most one tensor slice at a time. q/k/v and gate/up are
fused per shard ([q_r | k_r | v_r], [gate_r | up_r]); HF's [out, in] weights are read as they are and
transposed to [in, out] on the device.
"""

import functools
import json
import os
import re
from contextlib import ExitStack

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from nanovllm_jax.models.qwen3 import ModelArgs, Qwen3ForCausalLM

TP_AXIS = "tp"
# Checkpoint entries that carry no parameter of ours.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def safetensors_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> file, from model.safetensors.index.json (sharded) or the *.safetensors files."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir!r}; nanovllm-jax loads HF safetensors checkpoints")
    names = {}
    for file in files:
        with safe_open(os.path.join(model_dir, file), "np") as f:
            names.update(dict.fromkeys(f.keys(), os.path.join(model_dir, file)))
    return names


class _Reader:
    """Reads row/column slices of checkpoint tensors, cast to the model dtype, as [in, out] when asked."""

    def __init__(self, files: dict[str, str], dtype, stack: ExitStack):
        self.files, self.dtype, self.stack, self.handles = files, dtype, stack, {}

    def slice(self, name: str, rows=slice(None), cols=slice(None)) -> np.ndarray:
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(file, "np"))
        view = self.handles[file].get_slice(name)
        x = view[rows] if len(view.get_shape()) == 1 else view[rows, cols]
        return x.astype(self.dtype, copy=False)


def _param_plan(a: ModelArgs, full: ModelArgs, r: _Reader, tp: int):
    """Path -> (PartitionSpec, fn(shard) -> this shard's numpy array, transposed). `a` has per-shard sizes.
    A transposed parameter's fn gives the shard in HF's [out, in] layout: it is transposed on the device."""
    h, n, k, inter, v = a.head_dim, a.num_heads, a.num_kv_heads, a.intermediate_size, a.vocab_size

    def kv_rows(s):  # kv heads of shard s; replicated when tp exceeds the kv heads
        first = s * k if full.num_kv_heads >= tp else s * full.num_kv_heads // tp
        return slice(first * h, (first + k) * h)

    def vocab(name, s):
        rows = r.slice(name, slice(s * v, min((s + 1) * v, full.vocab_size)))
        return np.pad(rows, ((0, v - rows.shape[0]), (0, 0)))  # vocab padded to a multiple of tp

    plan = {"embed": (P(TP_AXIS, None), lambda s: vocab("model.embed_tokens.weight", s), False)}
    plan["norm.weight"] = (P(), lambda s: r.slice("model.norm.weight"), False)
    if not a.tie_word_embeddings:
        plan["lm_head"] = (P(None, TP_AXIS), lambda s: vocab("lm_head.weight", s), True)
    for i in range(a.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        qkv = [hf + f"self_attn.{p}_proj." for p in "qkv"]
        gate, up = hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"

        def fused_qkv(s, suffix, qkv=qkv):  # [q_s; k_s; v_s] rows
            parts = [r.slice(qkv[0] + suffix, slice(s * n * h, (s + 1) * n * h))]
            return np.concatenate(parts + [r.slice(name + suffix, kv_rows(s)) for name in qkv[1:]])

        def columns(name, s, width):
            return r.slice(name, cols=slice(s * width, (s + 1) * width))

        def norm(name):
            return P(), lambda s: r.slice(name), False

        plan |= {
            ours + "input_norm.weight": norm(hf + "input_layernorm.weight"),
            ours + "post_attn_norm.weight": norm(hf + "post_attention_layernorm.weight"),
            ours + "attn.qkv": (P(None, TP_AXIS), lambda s, f=fused_qkv: f(s, "weight"), True),
            ours + "attn.o": (
                P(TP_AXIS, None),
                lambda s, hf=hf: columns(hf + "self_attn.o_proj.weight", s, n * h),
                True,
            ),
            ours + "mlp.gate_up": (
                P(None, TP_AXIS),
                lambda s, g=gate, u=up: np.concatenate(
                    [r.slice(g, slice(s * inter, (s + 1) * inter)), r.slice(u, slice(s * inter, (s + 1) * inter))]
                ),
                True,
            ),
            ours + "mlp.down": (
                P(TP_AXIS, None),
                lambda s, hf=hf: columns(hf + "mlp.down_proj.weight", s, inter),
                True,
            ),
        }
        if a.qkv_bias:
            plan[ours + "attn.qkv_bias"] = (P(TP_AXIS), lambda s, f=fused_qkv: f(s, "bias"), False)
        if a.qk_norm:
            plan[ours + "attn.q_norm.weight"] = norm(hf + "self_attn.q_norm.weight")
            plan[ours + "attn.k_norm.weight"] = norm(hf + "self_attn.k_norm.weight")
    return plan


@functools.cache
def _transposer(sharding: NamedSharding):
    """A [out, in] array -> its [in, out] transpose with `sharding`, on the device (on the host a transpose
    is a strided copy, far slower than the device's)."""
    return jax.jit(lambda x: x.T, out_shardings=sharding)  # the [out, in] copy is freed when dropped


def expected_tensors(a: ModelArgs) -> set[str]:
    """The HF tensor names a checkpoint of this architecture must hold."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not a.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"}
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkv"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if a.qkv_bias:
            names |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
        if a.qk_norm:
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    return names


def make_mesh(tp: int) -> Mesh:
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tp} but only {len(devices)} {devices[0].platform} device(s) are visible; "
            f"use tensor_parallel_size <= {len(devices)}"
        )
    return Mesh(np.array(devices[:tp]), (TP_AXIS,))


def load_model(model_dir: str, hf_config, mesh: Mesh, attn_impl: str = "auto"):
    """Returns (graphdef, state, full ModelArgs, per-shard ModelArgs, state PartitionSpecs)."""
    full = ModelArgs.from_hf(hf_config)
    tp = mesh.size
    a = full.for_shard(tp)
    model = nnx.eval_shape(lambda: Qwen3ForCausalLM(a, TP_AXIS if tp > 1 else None, attn_impl))
    graphdef, abstract = nnx.split(model)
    files = safetensors_files(model_dir)
    present = {n for n in files if not _IGNORED.match(n)}
    expected = expected_tensors(a)
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - ({"lm_head.weight"} if a.tie_word_embeddings else set()))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir!r} does not match the {hf_config.model_type} config: "
            f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    with ExitStack() as stack:
        reader = _Reader(files, a.dtype, stack)
        plan = _param_plan(a, full, reader, tp)
        specs = {}

        def load(path, leaf):
            key = ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path[:-1])
            spec, read, transposed = plan[key]
            specs[key] = spec
            # Read in the checkpoint's layout: the transpose of ours for a transposed parameter.
            file_spec = P(*reversed(tuple(spec) + (None,) * (2 - len(spec)))) if transposed else spec
            file_shard = leaf.shape[::-1] if transposed else leaf.shape
            axes = tuple(file_spec) + (None,) * 4
            shape = tuple(d * tp if ax == TP_AXIS else d for d, ax in zip(file_shard, axes))

            def shard(index):
                axis = next((i for i, ax in enumerate(file_spec) if ax == TP_AXIS), None)
                s = 0 if axis is None else (index[axis].start or 0) // file_shard[axis]
                x = read(s)
                assert x.shape == file_shard, (key, x.shape, file_shard)
                return x

            x = jax.make_array_from_callback(shape, NamedSharding(mesh, file_spec), shard)
            return _transposer(NamedSharding(mesh, spec))(x) if transposed else x

        state = jax.tree_util.tree_map_with_path(load, abstract)
    if set(specs) != set(plan):
        raise AssertionError(f"parameters without a loader entry: {sorted(set(plan) ^ set(specs))}")
    spec_tree = jax.tree_util.tree_map_with_path(
        lambda path, _: specs[".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path[:-1])], abstract
    )
    return graphdef, state, full, a, spec_tree
