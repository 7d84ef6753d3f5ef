"""Tensor parallelism, TP=2 and TP=4 against TP=1 and HF: on four fake CPU devices (conftest), and on the
GPUs of the machine (`gpu`-marked runs on 2 or 4 GPUs; a TP size above the device count is skipped)."""

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.utils.loader import TP_AXIS

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024, num_kvcache_blocks=16, enforce_eager=True)
TP_SIZES = [tp for tp in (2, 4) if tp <= jax.device_count()]
needs_tp = pytest.mark.skipif(not TP_SIZES, reason="needs 2 or more devices")
needs_4 = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")


@pytest.fixture
def full_precision():
    """fp32 matmuls at full precision (XLA:GPU would use TF32), as HF's torch on CPU computes them."""
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", before)


def hf_greedy(path, prompts, max_new_tokens):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in prompts:
            tokens = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # as ignore_eos
                do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            out.append(tokens[0, len(ids) :].tolist())
    return out


def rel_err(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def prefill_logits(llm, prompts):
    """Logits of the last prompt token of each sequence, from one prefill step of the runner."""
    for p in prompts:
        llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=1))
    seqs, is_prefill, steps = llm.scheduler.schedule()
    assert is_prefill and len(seqs) == len(prompts)
    logits = llm.model_runner.prefill_logits(seqs)
    llm.scheduler.prefill_launched(seqs)
    llm.scheduler.postprocess(seqs, steps, [0] * len(seqs))
    return logits


@needs_tp
@pytest.mark.parametrize("size", ["tiny", "tiny-gqa4", "tiny-qwen2"])  # 2 kv heads: TP=4 replicates them
def test_tp_matches_single_device_and_hf(checkpoint, size, full_precision):
    path = checkpoint(size)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 700, n).tolist() for n in (5, 300, 40)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens, logits = {}, {}
    for tp in [1, *TP_SIZES]:
        llm = LLM(path, tensor_parallel_size=tp, **SMALL)
        logits[tp] = prefill_logits(llm, prompts)
        tokens[tp] = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert tokens[1] == hf_greedy(path, prompts, 12)
    for tp in TP_SIZES:
        assert tokens[tp] == tokens[1]
        # GPU attention kernels run fp32 dots as TF32 (kernels/paged_attention.py) at every TP size.
        np.testing.assert_allclose(logits[tp], logits[1], rtol=1e-4, atol=1e-4)


@needs_tp
def test_tp_bf16_logits_close_to_single_device(checkpoint):
    path = checkpoint("tiny-gqa4", "bfloat16")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 700, n).tolist() for n in (7, 260, 33)]
    logits = {tp: prefill_logits(LLM(path, tensor_parallel_size=tp, **SMALL), prompts) for tp in [1, *TP_SIZES]}
    ref = logits[1]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # top two logits apart by more than bf16 noise
    for tp in TP_SIZES:
        assert rel_err(logits[tp], ref) < 2e-2  # bf16 partial sums reduced across devices in another order
        assert (logits[tp].argmax(-1) == ref.argmax(-1))[clear].all()


@needs_4
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
    n, platform = jax.device_count(), jax.devices()[0].platform
    with pytest.raises(ValueError, match=f"tensor_parallel_size=8 but only {n} {platform} device"):
        LLM(checkpoint("tiny"), tensor_parallel_size=8, **SMALL)
    if n < 3:
        return
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=3 does not divide the 4 attention heads; use one of \[1, 2, 4\]"
    ):
        LLM(checkpoint("tiny"), tensor_parallel_size=3, **SMALL)


@needs_tp
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
        for tp in [1, *TP_SIZES]
    }
    assert all(tokens[tp] == tokens[1] for tp in TP_SIZES)
