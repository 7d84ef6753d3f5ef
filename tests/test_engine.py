"""The LLM engine end to end on CPU (tiny checkpoints, jnp reference kernels) against HF `generate`."""

import logging

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanovllm_jax import LLM, SamplingParams

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024, num_kvcache_blocks=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("tiny")


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, **SMALL)


@pytest.fixture(scope="module")
def hf(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)


def hf_greedy(hf, ids, max_new_tokens):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    out = out[0, len(ids) :].tolist()
    eos = set(hf.generation_config.eos_token_id)
    for i, t in enumerate(out):  # HF pads finished rows; keep up to and including the first EOS
        if t in eos:
            return out[: i + 1]
    return out


def prompts_of(lengths, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_matches_hf_mixed_lengths(llm, hf):
    # 300 and 600 tokens span two and three 256-token blocks; 600 > max_num_batched_tokens is chunked.
    prompts = prompts_of([5, 300, 77, 600])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf, prompt, 24)


def test_string_prompts_and_text(llm, hf, tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = ["Hello, how are you?", "What is machine learning?"]
    outs = llm.generate(prompts, [GREEDY, SamplingParams(temperature=0.0, max_tokens=7)], use_tqdm=False)
    assert [len(o["token_ids"]) for o in outs] == [24, 7] or any(t in llm.eos_ids for o in outs for t in o["token_ids"])
    for prompt, out, n in zip(prompts, outs, [24, 7]):
        assert out["token_ids"] == hf_greedy(hf, tok.encode(prompt), n)
        assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)


def test_prefix_cache_hits_count_fewer_prefill_tokens(llm):
    prompt = prompts_of([700], seed=5)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def run():
        llm.add_request(prompt, sp)
        prefill, outs = 0, []
        while not llm.is_finished():
            out, n = llm.step()
            prefill += max(n, 0)
            outs += out
        return prefill, outs[0][1]

    first, toks1 = run()
    second, toks2 = run()
    assert first == 700
    assert second == 700 - 512  # two full 256-token blocks hit the cache
    assert toks1 == toks2


def test_step_contract(llm):
    prompts = prompts_of([10, 20], seed=7)
    ids = [llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)) for p in prompts]
    out, n = llm.step()
    assert (out, n) == ([], 30)  # one prefill step of both prompts
    finished = {}
    counts = []
    while not llm.is_finished():
        out, n = llm.step()
        counts.append(n)
        finished.update(out)
    assert counts == [-4]  # one decode window: two steps of two sequences
    assert sorted(finished) == sorted(ids) and all(len(t) == 3 for t in finished.values())
    assert llm.step() == ([], 0)


def test_step_contract_one_step_windows(tiny):
    llm = LLM(tiny, **(SMALL | dict(enforce_eager=True, max_num_seqs=2)), decode_window=1)
    for p in prompts_of([10, 20], seed=7):
        llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    counts = []
    while not llm.is_finished():
        counts.append(llm.step()[1])
    assert counts == [30, -2, -2]


def test_preemption_under_tiny_cache(tiny, hf):
    # 3 blocks of 256 tokens; 3 prompts of 200 tokens growing past 256 need 6: preemption and recompute.
    llm = LLM(
        tiny, max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512, num_kvcache_blocks=3, enforce_eager=True
    )
    prompts = prompts_of([200, 210, 220], seed=9)
    sp = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outs] == [80, 80, 80]
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=80, min_new_tokens=80, do_sample=False)
        assert out["token_ids"] == ref[0, len(prompt) :].tolist()


def test_max_model_len_ends_sequences(llm):
    outs = llm.generate(
        prompts_of([1020], seed=3), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True), use_tqdm=False
    )
    assert len(outs[0]["token_ids"]) == 4  # 1020 + 4 == max_model_len


def test_sampling_is_reproducible_with_seed(tiny):
    prompts = prompts_of([8, 9], seed=11)
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=12, ignore_eos=True)
    a = LLM(tiny, enforce_eager=True, seed=123, **SMALL).generate(prompts, sp, use_tqdm=False)
    engine = LLM(tiny, enforce_eager=True, seed=123, **SMALL)
    engine.async_scheduling = False  # the same samples either way when no sequence ends early
    b = engine.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b]


def test_async_scheduling_matches_sync_with_eos(llm, monkeypatch):
    ahead = {"schedule_ahead": [], "schedule_prefill_ahead": []}
    for name, calls in ahead.items():
        method = getattr(llm.scheduler, name)
        monkeypatch.setattr(llm.scheduler, name, lambda m=method, c=calls: c.append(m()) or c[-1])
    prompts = prompts_of([300, 400, 17, 5], seed=13)  # two prefill steps: the second continues a chunk
    ref = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    ref = [o["token_ids"] for o in ref]
    assert any(ahead["schedule_prefill_ahead"])  # launched before the first step's tokens were read
    eos = ref[1][6]  # a token that sequence 1 emits mid-run is the EOS: sequences end at different steps
    limits = (20, 20, 9, 14)
    expected = [r[: min(r.index(eos) + 1 if eos in r else m, m)] for r, m in zip(ref, limits)]
    assert len({len(e) for e in expected}) > 1
    monkeypatch.setattr(llm.scheduler, "eos_ids", frozenset({eos}))
    sps = [SamplingParams(temperature=0.0, max_tokens=m) for m in limits]
    for mode in (True, False):  # the prompts' first blocks are cached now: one prefill step
        monkeypatch.setattr(llm, "async_scheduling", mode)
        ahead["schedule_ahead"].clear()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == expected
        assert any(ahead["schedule_ahead"]) == mode  # windows were launched ahead (only) with async scheduling


def test_bad_inputs_raise_and_engine_stays_usable(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=2)
    cases = [
        (lambda: llm.generate([[]], sp), ValueError, "empty prompt"),
        (lambda: llm.generate([""], sp), ValueError, "empty prompt"),
        (lambda: llm.generate([[1, 1000]], sp), ValueError, r"token ids must be in \[0, 1000\)"),
        (lambda: llm.generate([[-1]], sp), ValueError, "token ids must be in"),
        (lambda: llm.generate([[1] * 1025], sp), ValueError, "longer than max_model_len=1024"),
        (lambda: llm.generate(["a", "b"], [sp]), ValueError, "1 sampling_params for 2 prompts"),
        (lambda: llm.generate("hello", sp), TypeError, "prompts must be a list"),
        (lambda: llm.generate([1.5], sp), TypeError, "a prompt must be a str or a list of int"),
        (lambda: llm.generate(["a"], {"temperature": 0}), TypeError, "must be a SamplingParams"),
        (lambda: llm.add_request([1, 2, 3.0], sp), TypeError, r"element 2 is 3.0 \(float\)"),
        (lambda: llm.add_request([1, True], sp), TypeError, r"element 1 is True \(bool\)"),
        (lambda: llm.add_request(np.array([0.5, 1.0]), sp), TypeError, r"element 0 is .*0\.5"),
        # A good prompt before a bad one: nothing may be queued when the call fails.
        (lambda: llm.generate([[1, 2], [5000]], sp), ValueError, "token ids must be in"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        assert llm.is_finished()
    assert len(llm.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"]) == 2
    # numpy integers are token ids like ints
    want = llm.generate([[1, 2, 3]], sp, use_tqdm=False)
    assert llm.generate([np.array([1, 2, 3])], sp, use_tqdm=False) == want
    assert llm.generate([[np.int64(1), np.int32(2), np.uint16(3)]], sp, use_tqdm=False) == want


def test_constructor_errors(tiny, tmp_path):
    with pytest.raises(TypeError):
        LLM(tiny, max_num_seq=4)  # misspelt keyword
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is a file"):
        LLM(f"{tiny}/config.json")
    with pytest.raises(ValueError, match="decode_window must be at most"):
        LLM(tiny, decode_window=257)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(tiny, kv_cache_dtype="int4")
    (tmp_path / "config.json").write_text(open(f"{tiny}/config.json").read())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text(open(f"{tiny}/{name}").read())
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        LLM(str(tmp_path), **SMALL)
    with pytest.raises(ValueError, match="one sequence of max_model_len=1024 needs 4"):
        LLM(tiny, **(SMALL | dict(num_kvcache_blocks=2, enforce_eager=True)))


def test_no_compiles_in_steady_state(llm, caplog):
    llm.model_runner.programs.wait()  # the top-k/top-p programs, built in the background after start-up
    llm.generate(prompts_of([3, 40, 90]), GREEDY, use_tqdm=False)  # every program this workload needs
    programs = len(llm.model_runner.programs)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            llm.generate(prompts_of([4, 41, 91], seed=1), GREEDY, use_tqdm=False)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []
    assert len(llm.model_runner.programs) == programs


def test_first_runs_read_and_write_no_kv(llm):
    """On GPUs start-up runs every program once (`first_runs`) on the real cache: it must stay as it was."""
    runner = llm.model_runner
    prompts = prompts_of([5, 70], seed=17)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    before = [np.asarray(x) for x in jax.tree.leaves(runner.kv_caches)]
    runner.first_runs(runner.program_keys(use_top_k_top_p=False))
    after = [np.asarray(x) for x in jax.tree.leaves(runner.kv_caches)]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after, strict=True))
    assert int(runner.decode_state.step) == 0
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == first  # prefix-cache hits read the same blocks


def test_top_k_top_p_programs_are_built_in_the_background(tiny):
    llm = LLM(tiny, **SMALL)
    runner = llm.model_runner
    deferred = runner.program_keys(use_top_k_top_p=True)
    assert all(key in runner.programs.compiled for key in runner.program_keys(use_top_k_top_p=False))
    sp = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts_of([4, 30]), sp, use_tqdm=False)  # waits for the build if it still runs
    assert [len(o["token_ids"]) for o in outs] == [6, 6]
    assert all(key in runner.programs.compiled for key in deferred) and runner.programs.background_s > 0


@pytest.mark.gpu  # programs are saved on GPU only (XLA:CPU's deserialized programs can miss functions)
def test_second_start_loads_saved_programs(tiny, llm):
    llm.model_runner.programs.wait()
    again = LLM(tiny, **SMALL)  # the `llm` fixture, same settings, saved every program
    programs = again.model_runner.programs
    programs.wait()
    assert programs.loaded_from_disk == len(programs) > 0
    prompts = prompts_of([5, 50], seed=13)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert again.generate(prompts, GREEDY, use_tqdm=False) == first
    # A damaged file is ignored with a warning and rebuilt.
    key = next(iter(programs.compiled))
    with open(programs.path(key), "wb") as f:
        f.write(b"not a program")
    with pytest.warns(UserWarning, match="ignoring saved program"):
        third = LLM(tiny, **SMALL)
    third.model_runner.programs.wait()
    assert third.model_runner.programs.loaded_from_disk == len(third.model_runner.programs) - 1
    assert third.generate(prompts, GREEDY, use_tqdm=False) == first


def test_bucket_lists():
    from nanovllm_jax.engine.model_runner import decode_buckets, pick, prefill_buckets

    # Multiples of 16 rows (the decode GEMMs'); max_num_seqs rounded up to one is always a bucket.
    assert decode_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert decode_buckets(48) == [16, 32, 48]
    assert decode_buckets(2000)[-2:] == [1024, 2000]
    assert decode_buckets(5) == [16] and decode_buckets(40) == [16, 32, 48]
    assert prefill_buckets(16384) == [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    assert prefill_buckets(1000) == [64, 128, 256, 512, 1000]
    assert prefill_buckets(10) == [10]
    assert [pick(decode_buckets(48), n) for n in (1, 3, 33, 48)] == [16, 16, 48, 48]


@pytest.mark.parametrize("window", [1, 4, 16])
def test_windows_stop_rows_inside_them_like_hf(tiny, hf, window):
    """Greedy output with decode windows equals HF's for a mixed batch whose rows stop at different steps
    inside windows: on the checkpoint's EOS (a token the batch emits, made the EOS), on max_tokens, and on
    max_model_len."""
    llm = LLM(tiny, **(SMALL | dict(enforce_eager=True)), decode_window=window)
    prompts = prompts_of([5, 40, 300, 17, 1015], seed=13)
    free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = [hf_greedy_ignore_eos(hf, p, 20) for p in prompts]
    eos = ref[1][6]  # sequence 1 emits it mid-run: rows end at different steps
    llm.eos_ids = llm.scheduler.eos_ids = frozenset({eos})  # the host's view; the device's below
    llm.model_runner.eos_ids = (eos,)
    limits = [20, 20, 9, 14, 20]
    sps = [SamplingParams(temperature=0.0, max_tokens=m) for m in limits]
    outs = [o["token_ids"] for o in llm.generate(prompts, sps, use_tqdm=False)]
    for r, m, out, prompt in zip(ref, limits, outs, prompts):
        want = r[: min(r.index(eos) + 1 if eos in r else m, m, 1024 - len(prompt))]
        assert out == want
    assert len(outs[4]) == 1024 - 1015  # max_model_len
    assert [o["token_ids"] for o in llm.generate(prompts, free, use_tqdm=False)][:4] == ref[:4]


def hf_greedy_ignore_eos(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_step_outputs_and_abort(llm):
    before = llm.num_free_kv_blocks
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    a, b = (llm.add_request(p, sp) for p in prompts_of([300, 12], seed=21))
    got = {a: [], b: []}
    reasons = {}
    while not llm.is_finished():
        llm.step()
        for o in llm.step_outputs():
            got[o.seq_id] += o.new_token_ids
            assert o.num_completion_tokens == len(got[o.seq_id])
            if o.finished:
                reasons[o.seq_id] = o.finish_reason
        if len(got[a]) >= 10 and a not in reasons:
            assert llm.abort_request(a)  # mid-run, possibly with a window in flight
            reasons[a] = "abort"
    assert not llm.abort_request(a) and not llm.abort_request(12345)
    assert reasons == {a: "abort", b: "length"} and len(got[b]) == 30
    assert got[b] == llm.generate(prompts_of([300, 12], seed=21)[1:], sp, use_tqdm=False)[0]["token_ids"]
    assert llm.num_free_kv_blocks == before


def test_interrupted_generate_leaves_engine_usable(llm, monkeypatch):
    prompts = prompts_of([50, 60], seed=4)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = llm.generate(prompts, sp, use_tqdm=False)
    before = llm.num_free_kv_blocks
    step, calls = llm.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, sp, use_tqdm=False)
    monkeypatch.undo()
    assert llm.is_finished() and llm.num_free_kv_blocks == before
    assert llm.generate(prompts, sp, use_tqdm=False) == ref


def test_fp8_kv_cache_end_to_end(tiny):
    """kv_cache_dtype="fp8": the cache holds about 4x the fp32 blocks in the same bytes; a batch decodes as
    each prompt alone, through windows of 1 and 8 steps, prefix-cache hits and preemption alike."""
    from nanovllm_jax.engine.kv_cache import CPU_KV_CACHE_BYTES

    fp8 = LLM(tiny, **(SMALL | dict(num_kvcache_blocks=-1, enforce_eager=True)), kv_cache_dtype="fp8")
    layout = fp8.model_runner.cache_layout
    if jax.default_backend() == "cpu":  # a GPU sizes the cache from its free memory
        assert fp8.model_runner.num_blocks == CPU_KV_CACHE_BYTES // layout.block_bytes()
    a = fp8.model_runner.args
    assert layout.block_bytes() == a.num_layers * 2 * a.num_kv_heads * 256 * (a.head_dim + 4)  # bytes + scales
    prompts = prompts_of([5, 300, 600], seed=31)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    batch = [o["token_ids"] for o in fp8.generate(prompts, sp, use_tqdm=False)]
    assert [fp8.generate([p], sp, use_tqdm=False)[0]["token_ids"] for p in prompts] == batch  # prefix hits too
    one_step = LLM(tiny, **(SMALL | dict(enforce_eager=True)), kv_cache_dtype="fp8", decode_window=1)
    assert [o["token_ids"] for o in one_step.generate(prompts, sp, use_tqdm=False)] == batch
    # 4 blocks: the three prompts (1 + 2 + 3 blocks) cannot all run at once, so sequences are preempted.
    tight = LLM(tiny, **(SMALL | dict(enforce_eager=True, num_kvcache_blocks=4)), kv_cache_dtype="fp8")
    assert [o["token_ids"] for o in tight.generate(prompts, sp, use_tqdm=False)] == batch
    # fp8 keys and values change the logits a little, not the model: most greedy tokens agree with fp32 KV.
    full = LLM(tiny, **(SMALL | dict(enforce_eager=True)))
    ref = [o["token_ids"] for o in full.generate(prompts, sp, use_tqdm=False)]
    assert sum(x == y for r, b in zip(ref, batch) for x, y in zip(r, b)) >= 0.5 * 60
