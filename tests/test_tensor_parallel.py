"""Tensor parallelism on fake CPU devices (conftest sets four): TP=2 and TP=4 against TP=1."""

import jax
import numpy as np
import pytest

from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.utils.loader import TP_AXIS

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024, num_kvcache_blocks=16, enforce_eager=True)


def prefill_logits(llm, prompts):
    """Logits of the last prompt token of each sequence, from one prefill step of the runner."""
    for p in prompts:
        llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=1))
    seqs, is_prefill, _ = llm.scheduler.schedule()
    assert is_prefill and len(seqs) == len(prompts)
    logits = llm.model_runner.prefill_logits(seqs)
    llm.scheduler.postprocess(seqs, [0] * len(seqs))
    return logits


@pytest.mark.parametrize("size", ["tiny", "tiny-gqa4", "tiny-qwen2"])  # 2 kv heads: TP=4 replicates them
def test_tp_matches_single_device(checkpoint, size):
    path = checkpoint(size)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 700, n).tolist() for n in (5, 300, 40)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens, logits = {}, {}
    for tp in (1, 2, 4):
        llm = LLM(path, tensor_parallel_size=tp, **SMALL)
        logits[tp] = prefill_logits(llm, prompts)
        tokens[tp] = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    for tp in (2, 4):
        assert tokens[tp] == tokens[1]
        np.testing.assert_allclose(logits[tp], logits[1], rtol=1e-4, atol=1e-4)


def test_weights_and_cache_are_sharded(checkpoint):
    llm = LLM(checkpoint("tiny-gqa4"), tensor_parallel_size=4, **SMALL)  # 8 q heads, 2 kv heads
    runner = llm.model_runner
    state = jax.tree.unflatten(runner.state_def, runner.state)
    qkv = state["layers"][0]["attn"]["qkv"][...]
    # Per device: 2 q heads + 1 (replicated) k head + 1 v head, of head_dim 64; never the whole matrix.
    assert {s.data.shape for s in qkv.addressable_shards} == {(80, 4 * 64)}
    embed = state["embed"][...]
    assert {s.data.shape for s in embed.addressable_shards} == {(-(-777 // 4), 80)}  # vocab-parallel, padded
    k_cache = runner.kv_caches[0][0]
    assert k_cache.sharding.spec == jax.sharding.PartitionSpec(None, TP_AXIS)
    assert {s.data.shape[1] for s in k_cache.addressable_shards} == {1}


def test_tp_errors_name_the_numbers(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=8 but only 4 cpu device"):
        LLM(checkpoint("tiny"), tensor_parallel_size=8, **SMALL)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=3 does not divide the 4 attention heads; use one of \[1, 2, 4\]"
    ):
        LLM(checkpoint("tiny"), tensor_parallel_size=3, **SMALL)


def test_tp_fp8_kv_cache_matches_single_device(checkpoint):
    # fp8 pages and their scales shard by kv head like the pages; at TP=4 the 2 kv heads are replicated.
    path = checkpoint("tiny-gqa4")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 700, n).tolist() for n in (5, 300, 40)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {
        tp: [
            o["token_ids"]
            for o in LLM(path, tensor_parallel_size=tp, kv_cache_dtype="fp8", **SMALL).generate(
                prompts, sp, use_tqdm=False
            )
        ]
        for tp in (1, 2, 4)
    }
    assert tokens[2] == tokens[1] and tokens[4] == tokens[1]
