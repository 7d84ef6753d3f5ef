"""The Flax Qwen3 model against Hugging Face's torch Qwen3ForCausalLM: full-sequence logits."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.utils.loader import load_model, make_mesh

BLOCK = 256


def flax_logits(path, ids, attn_impl="reference"):
    graphdef, state, full, a, _ = load_model(path, AutoConfig.from_pretrained(path), make_mesh(1), attn_impl)
    model = nnx.merge(graphdef, state)
    T = len(ids)
    pages = -(-T // BLOCK)
    shape = (pages + 1, a.num_kv_heads, BLOCK, a.head_dim)
    caches = [(jnp.full(shape, jnp.nan, a.dtype), jnp.full(shape, jnp.nan, a.dtype)) for _ in range(a.num_layers)]
    table = np.arange(pages, 0, -1, dtype=np.int32)  # reversed pages: logical order != physical order
    slots = table[np.arange(T) // BLOCK] * BLOCK + np.arange(T) % BLOCK
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        block_tables=jnp.asarray(table[None]),
        context_lens=jnp.array([T], jnp.int32),
        cu_q_lens=jnp.array([0, T], jnp.int32),
        is_prefill=True,
    )
    hidden, _ = model(jnp.asarray(ids, jnp.int32), jnp.arange(T, dtype=jnp.int32), caches, md)
    return np.asarray(model.compute_logits(hidden)), full


def hf_logits(path, ids, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].float().numpy()


def rel_err(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("size", ["tiny", "tiny-mha", "tiny-gqa4", "tiny-qwen2"])
def test_fp32_logits_match_hf(checkpoint, size):
    path = checkpoint(size)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    ids = np.random.default_rng(1).integers(0, vocab, 300)  # spans two cache pages
    ours, _ = flax_logits(path, ids)
    assert rel_err(ours, hf_logits(path, ids, torch.float32)) < 1e-4


def test_bf16_logits_match_hf(checkpoint):
    path = checkpoint("tiny", "bfloat16")
    ids = np.random.default_rng(2).integers(0, 1000, 64)
    ours, full = flax_logits(path, ids)
    assert full.dtype == jnp.bfloat16
    ref = hf_logits(path, ids, torch.bfloat16)
    assert rel_err(ours, ref) < 2e-2
    # Argmax agreement where HF's top two logits are not within bf16 noise of each other.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()


def test_sharded_old_style_checkpoint_loads(checkpoint):
    path = checkpoint("tiny-gqa4", num_shards=3, config_style="old")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    config = json.load(open(os.path.join(path, "config.json")))
    assert "rope_theta" in config and "rope_parameters" not in config
    ids = np.random.default_rng(3).integers(0, 777, 50)
    ours, full = flax_logits(path, ids)
    assert full.rope_theta == 1e6
    assert rel_err(ours, hf_logits(path, ids, torch.float32)) < 1e-4


def test_loader_names_missing_and_unexpected_tensors(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = checkpoint("tiny")
    for name in os.listdir(src):
        if name != "model.safetensors":
            os.symlink(os.path.join(src, name), tmp_path / name)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\].*"
        r"unexpected tensors \['model.layers.0.mlp.extra.weight'\]",
    ):
        load_model(str(tmp_path), AutoConfig.from_pretrained(str(tmp_path)), make_mesh(1))


def test_loader_rejects_directory_without_weights(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(checkpoint("tiny"), "config.json")).read())
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path), AutoConfig.from_pretrained(str(tmp_path)), make_mesh(1))
