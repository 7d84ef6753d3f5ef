"""Config and SamplingParams: defaults of the API reference and clear errors for bad values."""

import dataclasses

import pytest

from nanovllm_jax import SamplingParams
from nanovllm_jax.config import Config


def test_config_defaults_and_clipping(checkpoint):
    path = checkpoint("tiny")
    c = Config(path)
    assert (c.max_num_batched_tokens, c.max_num_seqs, c.gpu_memory_utilization) == (16384, 512, 0.9)
    assert (c.tensor_parallel_size, c.enforce_eager, c.eos) == (1, False, -1)
    assert (c.kvcache_block_size, c.num_kvcache_blocks) == (256, -1)
    assert c.max_model_len == 2048  # 4096 clipped to the tiny model's max_position_embeddings
    assert c.hf_config.vocab_size == 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_model_len = 10


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kvcache_block_size=100), "must be >= 256"),
        (dict(kvcache_block_size=384), "multiple of 256"),
        (dict(tensor_parallel_size=9), "between 1 and 8"),
        (dict(tensor_parallel_size=0), ">= 1"),
        (dict(gpu_memory_utilization=0.0), r"\(0, 1\]"),
        (dict(gpu_memory_utilization=1.5), r"\(0, 1\]"),
        (dict(max_num_seqs=0), ">= 1"),
        (dict(max_num_batched_tokens=-5), ">= 1"),
        (dict(max_model_len=0), ">= 1"),
        (dict(num_kvcache_blocks=0), "-1 .* or positive"),
    ],
)
def test_config_rejects_bad_values(checkpoint, kw, match):
    with pytest.raises(ValueError, match=match):
        Config(checkpoint("tiny"), **kw)


def test_config_rejects_bad_model_dir(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Config(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        Config(str(tmp_path))
    with pytest.raises(TypeError, match="max_num_seqs must be an int"):
        Config(checkpoint("tiny"), max_num_seqs=2.5)


def test_sampling_params_defaults_and_errors():
    sp = SamplingParams()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.ignore_eos) == (1.0, 1.0, -1, 16, False)
    SamplingParams(temperature=0.0, top_k=1, top_p=0.5)
    for kw, match in [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.1), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be -1"),
        (dict(top_k=-2), "top_k must be -1"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kw)
    with pytest.raises(TypeError):
        SamplingParams(max_tokens=1.5)
    with pytest.raises(TypeError):
        SamplingParams(ignore_eos="yes")
