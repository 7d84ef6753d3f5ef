"""Scheduler on CPU with toy configs (block size 256): exact batches, chunks, block tables and stops,
plus a randomized run against a fake model that checks every KV read against a fake paged cache."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from nanovllm_jax.config import Config
from nanovllm_jax.engine.scheduler import Scheduler
from nanovllm_jax.engine.sequence import Sequence, SequenceStatus
from nanovllm_jax.sampling_params import SamplingParams

BS = 256
VOCAB = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf_config = {
        "model_type": "qwen3",
        "max_position_embeddings": 1024,
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 32,
    }
    (path / "config.json").write_text(json.dumps(hf_config))
    return str(path)


@pytest.fixture
def make(model_dir):
    def make(num_blocks: int, eos_ids: set[int] = frozenset(), **config) -> Scheduler:
        config.setdefault("decode_window", 1)
        return Scheduler(Config(model_dir, **config), set(eos_ids), num_blocks)

    return make


def tokens(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(2, VOCAB), k=n)


def seq(token_ids: list[int], **sampling) -> Sequence:
    return Sequence(token_ids, SamplingParams(**sampling), BS)


def step(sched: Scheduler, sampled: int | list[int] = 9) -> tuple[list[Sequence], bool, list[int]]:
    """schedule + post-processing (one token per sequence); returns the batch, its kind and each
    sequence's num_scheduled_tokens."""
    seqs, is_prefill, steps = sched.schedule()
    counts = [s.num_scheduled_tokens for s in seqs]
    finish(sched, seqs, is_prefill, steps, sampled if isinstance(sampled, list) else [sampled] * len(seqs))
    return seqs, is_prefill, counts


def finish(sched: Scheduler, seqs: list[Sequence], is_prefill: bool, steps: list[int], sampled: list[int]):
    """A scheduled step's launch and post-processing, as the engine does them, with one sample per sequence."""
    if is_prefill:
        sched.prefill_launched(seqs)
        sched.postprocess(seqs, steps, sampled)
    else:
        assert steps == [1] * len(seqs)
        sched.postprocess_window(seqs, steps, np.asarray([sampled]))


def test_chunked_prefill_of_a_long_prompt(make):
    sched = make(8, max_num_batched_tokens=300)
    a, b = seq(tokens(700, 0)), seq(tokens(100, 1))
    sched.add(a)
    sched.add(b)
    assert step(sched) == ([a], True, [300])
    assert a.block_table == [0, 1, 2] and a.num_cached_tokens == 300 and a.num_tokens == 700  # sample dropped
    assert list(sched.waiting) == [a, b] and a.status == SequenceStatus.WAITING
    assert list(sched.block_manager.hash_to_block_id.values()) == [0]  # only the computed full block
    assert step(sched) == ([a], True, [300])
    assert a.num_cached_tokens == 600 and list(sched.block_manager.hash_to_block_id.values()) == [0, 1]
    assert step(sched, [5, 6]) == ([a, b], True, [100, 100])
    assert b.block_table == [3] and list(sched.running) == [a, b] and not sched.waiting
    assert (a.num_tokens, a.num_cached_tokens, a.last_token) == (701, 700, 5)
    assert (b.num_tokens, b.num_cached_tokens, b.last_token) == (101, 100, 6)
    assert step(sched, [7, 8]) == ([a, b], False, [1, 1])
    assert a.num_cached_tokens == 701 and (a.completion_token_ids, b.completion_token_ids) == ([5, 7], [6, 8])


def test_a_later_sequence_is_chunked_and_continued_before_new_admissions(make):
    sched = make(8, max_num_batched_tokens=300)
    a, b, c = seq(tokens(200, 0)), seq(tokens(700, 1)), seq(tokens(50, 2))
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == ([a, b], True, [200, 100])
    assert list(sched.running) == [a] and list(sched.waiting) == [b, c]
    assert step(sched) == ([b], True, [300])
    assert step(sched) == ([b], True, [300])  # exactly the rest: no budget left for c
    assert list(sched.running) == [a, b] and list(sched.waiting) == [c] and b.num_tokens == 701
    assert step(sched) == ([c], True, [50])
    assert step(sched) == ([a, b, c], False, [1, 1, 1])


def test_prefix_hits_do_not_count_against_the_token_budget(make):
    sched = make(8, max_num_batched_tokens=300)
    a = seq(tokens(600, 0))
    sched.add(a)
    step(sched)
    step(sched)
    b, c = seq(a.prompt_token_ids + tokens(50, 1)), seq(tokens(200, 2))
    sched.add(b)
    sched.add(c)
    assert step(sched) == ([b, c], True, [138, 162])  # b: 650 tokens, 512 cached; c gets the rest
    assert b.block_table == [0, 1, 3] and a.block_table == [0, 1, 2]
    assert [blk.ref_count for blk in sched.block_manager.blocks[:5]] == [2, 2, 1, 1, 1]


def test_max_num_seqs(make):
    sched = make(8, max_num_seqs=2)
    s0, s1, s2 = (seq(tokens(10, i), max_tokens=2) for i in range(3))
    for s in (s0, s1, s2):
        sched.add(s)
    assert step(sched) == ([s0, s1], True, [10, 10])
    assert step(sched) == ([s0, s1], False, [1, 1])  # running is full: s2 waits
    assert s0.is_finished and s1.is_finished and not sched.running
    assert step(sched) == ([s2], True, [10])


def test_identical_prompts_in_the_same_step(make):
    sched = make(8)
    prompt = tokens(600, 0)
    a, b = seq(prompt), seq(prompt)
    sched.add(a)
    sched.add(b)
    assert step(sched) == ([a, b], True, [600, 600])  # b cannot hit a's blocks: not computed yet
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    bm = sched.block_manager
    assert bm.blocks[0].hash == bm.blocks[3].hash and bm.blocks[1].hash == bm.blocks[4].hash
    assert sorted(bm.hash_to_block_id.values()) == [3, 4]  # the latest registration wins
    c = seq(prompt)
    sched.add(c)
    assert step(sched) == ([c], True, [88])
    assert c.block_table == [3, 4, 6] and c.num_cached_tokens == 600


def test_identical_prompt_does_not_hit_a_chunk_still_being_computed(make):
    sched = make(8, max_num_batched_tokens=400)
    prompt = tokens(600, 0)
    a, b = seq(prompt), seq(prompt)
    sched.add(a)
    sched.add(b)
    assert step(sched) == ([a], True, [400])  # computes block 0 and half of block 1
    assert step(sched) == ([a, b], True, [200, 200])
    # b shares a's computed block 0 only: a's block 1 gets its last tokens in this same step.
    assert b.block_table == [0, 3, 4] and a.block_table == [0, 1, 2]
    assert b.num_cached_tokens == 456
    assert step(sched) == ([b], True, [144])
    assert b.num_tokens == 601 and b.num_cached_tokens == 600


def test_prefill_steps_scheduled_ahead_continue_chunks_and_hit_launched_blocks(make):
    sched = make(16, max_num_batched_tokens=400)
    prompt = tokens(600, 0)
    a, b, c = seq(prompt), seq(prompt[:512] + tokens(50, 1)), seq(tokens(100, 2))
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule() == ([a], True, [0])  # a chunk: its sample does not count
    sched.prefill_launched([a])
    assert a.num_cached_tokens == 400
    # The next step, before the first one's tokens are in: a goes on; b hits a's block 0 (launched), not
    # its block 1, which this same step completes.
    assert sched.schedule_prefill_ahead() == ([a, b], [1, 0])
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert [s.num_scheduled_tokens for s in (a, b)] == [200, 200] and b.num_cached_tokens == 256
    assert sched.postprocess([a], [0], [99]) == ([], []) and a.completion_token_ids == []
    sched.prefill_launched([a, b])
    assert sched.schedule_prefill_ahead() == ([b, c], [1, 1])
    sched.prefill_launched([b, c])
    assert sched.postprocess([a, b], [1, 0], [5, 99]) == ([], [a]) and a.completion_token_ids == [5]
    assert sched.schedule_prefill_ahead() is None  # nothing waits
    assert sched.postprocess([b, c], [1, 1], [6, 7]) == ([], [b, c])
    assert [s.completion_token_ids for s in (b, c)] == [[6], [7]]
    assert step(sched) == ([a, b, c], False, [1, 1, 1])


def test_a_prefill_aborted_in_flight_gets_no_token(make):
    sched = make(8)
    a, b = seq(tokens(300, 0)), seq(tokens(300, 1))
    sched.add(a)
    seqs, _, steps = sched.schedule()
    sched.prefill_launched(seqs)
    sched.add(b)
    assert sched.schedule_prefill_ahead() == ([b], [1])
    sched.prefill_launched([b])
    assert sched.abort(b.seq_id) is b
    assert sched.postprocess(seqs, steps, [3]) == ([], [a])
    assert sched.postprocess([b], [1], [4]) == ([], []) and b.completion_token_ids == []
    assert list(sched.running) == [a] and sched.block_manager.num_free_blocks == 6


def test_preemption_order_and_readmission_on_own_prefix(make):
    sched = make(3, max_model_len=512)
    s0 = seq(tokens(256, 0), max_tokens=2)
    s1, s2 = seq(tokens(256, 1)), seq(tokens(256, 2))
    for s in (s0, s1, s2):
        sched.add(s)
    assert step(sched, [1, 2, 3]) == ([s0, s1, s2], True, [256, 256, 256])
    assert [s.block_table for s in (s0, s1, s2)] == [[0], [1], [2]]
    bm = sched.block_manager
    # Each needs a second block for its 257th token; none is free. s0 evicts the newest (s2), then
    # s1 finds nothing left to preempt but itself. Both return to the front of the queue, in order.
    seqs, is_prefill, steps = sched.schedule()
    assert (seqs, is_prefill, steps) == ([s0], False, [1])
    assert s0.block_table == [0, 2] and list(sched.running) == [s0] and list(sched.waiting) == [s1, s2]
    assert all(s.status == SequenceStatus.WAITING and s.block_table == [] for s in (s1, s2))
    assert (s1.num_cached_tokens, s1.num_tokens, s1.completion_token_ids) == (0, 257, [2])
    assert list(bm.free_block_ids) == [1]
    finish(sched, seqs, is_prefill, steps, [7])
    assert s0.is_finished and s0.completion_token_ids == [1, 7] and list(bm.free_block_ids) == [1, 2, 0]
    # s1 hits its own freed block 1; s2's block was reused by s0, so s2 (2 blocks) does not fit.
    assert step(sched, [8]) == ([s1], True, [1])
    assert s1.block_table == [1, 2] and s1.completion_token_ids == [2, 8] and list(sched.waiting) == [s2]
    assert step(sched) == ([s1], False, [1])


def test_stop_conditions(make):
    sched = make(8, eos_ids={5, 7}, max_model_len=512)
    a = seq(tokens(3, 0), max_tokens=10)
    b = seq(tokens(3, 1), max_tokens=3, ignore_eos=True)
    c = seq(tokens(510, 2), max_tokens=100)
    d = seq(tokens(512, 3), max_tokens=100)  # a prompt of max_model_len tokens still gets one token
    e = seq(tokens(3, 4), max_tokens=10)
    streams = {a: [3, 7], b: [7, 7, 5], c: [3, 3], d: [3], e: [5]}
    for s in streams:
        sched.add(s)
    finished = []
    while not sched.is_finished():
        seqs, is_prefill, steps = sched.schedule()
        finish(sched, seqs, is_prefill, steps, [streams[s][s.num_completion_tokens] for s in seqs])
        finished += [s for s in seqs if s.is_finished]
    assert finished == [d, e, a, c, b]
    assert {s: s.completion_token_ids for s in streams} == streams
    assert c.num_tokens == 512 and d.num_tokens == 513
    assert all(s.block_table == [] for s in streams) and sched.block_manager.num_free_blocks == 8


def test_cache_capacity(make):
    with pytest.raises(ValueError, match="fewer than one"):
        make(1, max_model_len=257)


def fake_token(key: int, position: int) -> int:
    return (key * 1_000_003 + position * 7_919) * 2_654_435_761 % 2**32 % 40


class FakeModel:
    """Writes a fingerprint of each token's whole prefix into its paged slot, then checks every slot a
    sequence attends to; returns a deterministic token per (request, position) so recomputation after
    preemption must reproduce the same completion. Decode windows run step by step, each row stopping
    itself on EOS or after its planned steps, as on the device."""

    def __init__(self, num_blocks: int, keys: dict[int, int], eos_ids: set[int]):
        self.cache = np.full(num_blocks * BS, -1, np.int64)
        self.keys, self.eos_ids = keys, eos_ids
        self.fingerprints: dict[int, list[int]] = {}

    def token_at(self, s: Sequence, p: int) -> int:
        return s.token_ids[p] if p < s.num_tokens else fake_token(self.keys[s.seq_id], p)

    def prefix_fingerprints(self, s: Sequence, n: int) -> np.ndarray:
        fp = self.fingerprints.setdefault(s.seq_id, [])
        while len(fp) < n:
            fp.append(hash((fp[-1] if fp else 0, self.token_at(s, len(fp)))) & (2**62 - 1))
        return np.asarray(fp[:n])

    def launch(self, seqs: list[Sequence], is_prefill: bool, steps: list[int]):
        """A step or window as the engine launches it: its positions and slots are fixed now (before the
        engine counts the window's tokens in flight), it computes later (`collect`, in launch order)."""
        job = []
        for s, n in zip(seqs, steps):
            # Prefill: from the first uncached token; decode: from the last token known or in flight.
            start = s.num_cached_tokens if is_prefill else s.num_tokens + s.num_inflight_tokens - 1
            count = s.num_scheduled_tokens if is_prefill else n
            assert count >= 1 and len(s.block_table) * BS >= start + count
            positions = np.arange(start + count)
            job.append((s, start, count, np.asarray(s.block_table)[positions // BS] * BS + positions % BS))
        return is_prefill, job

    def collect(self, launch) -> np.ndarray:
        is_prefill, job = launch
        if is_prefill:  # all writes of the step first, as in a layer of the real model
            for s, start, count, slots in job:
                self.cache[slots[start:]] = self.prefix_fingerprints(s, start + count)[start:]
            for s, start, count, slots in job:
                np.testing.assert_array_equal(self.cache[slots], self.prefix_fingerprints(s, start + count))
            # A prefill chunk short of the last token samples garbage, which must be ignored.
            return np.asarray(
                [
                    self.token_at(s, start + count) if start + count == s.num_tokens else 10**9
                    for s, start, count, _ in job
                ]
            )
        # A window: a row stops after its planned steps or its EOS. A sequence finished since the launch
        # (an abort) still computes on the device: garbage into the slots it had.
        out = np.full((max(c for _, _, c, _ in job), len(job)), -1)
        stopped = [False] * len(job)
        for j in range(out.shape[0]):
            rows = [
                (r, s, start + j, slots)
                for r, (s, start, count, slots) in enumerate(job)
                if j < count and not stopped[r]
            ]
            for _, s, p, slots in rows:
                self.cache[slots[p]] = -7 if s.is_finished else self.prefix_fingerprints(s, p + 1)[p]
            for r, s, p, slots in rows:
                if not s.is_finished:
                    np.testing.assert_array_equal(self.cache[slots[: p + 1]], self.prefix_fingerprints(s, p + 1))
                out[j, r] = t = self.token_at(s, p + 1)
                stopped[r] = not s.ignore_eos and t in self.eos_ids
        return out


def check_invariants(sched: Scheduler, prefilling: list[Sequence] = ()):
    """`prefilling`: the sequences of a prefill step in flight (launched: their prompts count as cached)."""
    bm = sched.block_manager
    holders = list(sched.running) + [s for s in sched.waiting if s.block_table]
    assert all(s is sched.waiting[0] for s in holders if s.status == SequenceStatus.WAITING)
    held = Counter(b for s in holders for b in s.block_table)
    assert [blk.ref_count for blk in bm.blocks] == [held[i] for i in range(len(bm.blocks))]
    free = list(bm.free_block_ids)
    assert set(held) == bm.used_block_ids and not bm.used_block_ids & set(free)
    assert sorted(free + list(bm.used_block_ids)) == list(range(len(bm.blocks)))
    assert all(bm.blocks[b].hash == h for h, b in bm.hash_to_block_id.items())
    assert len(sched.running) <= sched.max_num_seqs
    for s in sched.running:
        assert s.status == SequenceStatus.RUNNING
        if s in prefilling:  # no token yet; the blocks for the KV of the whole prompt
            assert s.num_cached_tokens == s.num_tokens and len(s.block_table) == -(-s.num_tokens // BS)
            continue
        assert s.num_cached_tokens == s.num_tokens - 1
        # Exactly the blocks for the KV of every token known or in flight but the last.
        assert len(s.block_table) == -(-(s.num_tokens + s.num_inflight_tokens - 1) // BS)
    for s in sched.waiting:
        assert s.num_cached_tokens == 0 or s.block_table


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("trial", range(12))
def test_randomized_run_finishes_every_request_exactly_once(make, trial, pipelined):
    """The engine's loop (see LLMEngine.step), with and without scheduling decode windows ahead, windows
    of 1 to 16 steps, and some requests aborted mid-run."""
    rng = random.Random(trial)
    max_model_len = 1024
    num_blocks = rng.randint(max_model_len // BS, 8)
    eos_ids = {0, 1}
    window = rng.choice([1, 4, 8, 16])
    sched = make(
        num_blocks,
        eos_ids,
        max_model_len=max_model_len,
        max_num_seqs=rng.randint(1, 16),
        max_num_batched_tokens=rng.choice([17, 100, 256, 700, 4096]),
        decode_window=window,
    )
    shared = [tokens(rng.choice([256, 300, 600]), 100 * trial + i) for i in range(3)]
    requests, expected, keys = [], {}, {}
    for i in range(rng.randint(10, 25)):
        prompt = rng.choice(shared)[: rng.randint(1, 600)] + tokens(rng.randint(0, 200), 1000 * trial + i)
        s = seq(prompt, max_tokens=rng.randint(1, 400), ignore_eos=rng.random() < 0.6)
        keys[s.seq_id] = key = 1000 * trial + i
        completion = []
        while True:
            completion.append(t := fake_token(key, s.num_prompt_tokens + len(completion)))
            if (
                (not s.ignore_eos and t in eos_ids)
                or len(completion) == s.max_tokens
                or s.num_prompt_tokens + len(completion) >= max_model_len
            ):
                break
        expected[s.seq_id] = completion
        requests.append(s)
    aborted = {s.seq_id for s in requests if rng.random() < 0.15}
    model, done, in_flight, num_ahead, num_windows = FakeModel(num_blocks, keys, eos_ids), {}, None, 0, 0
    num_prefills_ahead = 0

    def launch(seqs, is_prefill, steps):
        job = model.launch(seqs, is_prefill, steps)
        if is_prefill:
            sched.prefill_launched(seqs)
        else:
            for s, n in zip(seqs, steps):
                s.num_inflight_tokens += n
        return seqs, is_prefill, steps, job

    added = []
    for num_steps in range(10_000):
        if requests and (not num_steps or rng.random() < 0.3):  # some requests arrive mid-run
            sched.add(requests.pop(0))
            added.append(sched.waiting[-1])
        for s in added:  # some requests are aborted while they wait or run
            if s.seq_id in aborted and s.num_completion_tokens >= 2 and rng.random() < 0.5:
                if s.is_finished:
                    assert sched.abort(s.seq_id) is None  # too late: it finished
                else:
                    assert sched.abort(s.seq_id) is s and s.finish_reason == "abort" and not s.block_table
                aborted.discard(s.seq_id)
        if in_flight is None:
            if sched.is_finished():
                if not requests:
                    break
                continue
            seqs, is_prefill, steps = sched.schedule()
            assert len(set(seqs)) == len(seqs) <= sched.max_num_seqs
            if is_prefill:  # only the last sequence of a step may be a chunk
                assert steps[:-1] == [1] * (len(steps) - 1) and steps[-1] in (0, 1)
            else:
                assert all(1 <= n <= window for n in steps)
            if is_prefill:
                assert sum(s.num_scheduled_tokens for s in seqs) <= sched.max_num_batched_tokens
            in_flight = launch(seqs, is_prefill, steps)
        seqs, is_prefill, steps, job = in_flight
        in_flight = None
        if pipelined and is_prefill and (ahead := sched.schedule_prefill_ahead()):
            assert len(set(ahead[0])) == len(ahead[0]) and set(ahead[0]) & set(seqs) <= {seqs[-1]}  # a chunk goes on
            in_flight, num_prefills_ahead = launch(*ahead[:1], True, ahead[1]), num_prefills_ahead + 1
        elif pipelined and not is_prefill and (ahead := sched.schedule_ahead()):
            assert set(ahead[0]) <= set(seqs)
            in_flight, num_ahead = launch(*ahead[:1], False, ahead[1]), num_ahead + 1
        tokens_out = model.collect(job)
        if is_prefill:
            finished, _ = sched.postprocess(seqs, steps, tokens_out)
        else:
            num_windows += max(steps) > 1
            finished, _ = sched.postprocess_window(seqs, steps, tokens_out)
        for s in finished:
            assert s.seq_id not in done
            done[s.seq_id] = s.completion_token_ids
        check_invariants(sched, in_flight[0] if in_flight and in_flight[1] else [])
    assert in_flight is None
    aborted = {s.seq_id for s in added if s.finish_reason == "abort"}
    assert all(done.get(i) == c for i, c in expected.items() if i not in aborted)
    assert num_ahead > 0 if pipelined else num_ahead == 0
    assert num_prefills_ahead == 0 or pipelined
    assert num_windows > 0 if window > 1 else num_windows == 0
    assert sched.block_manager.num_free_blocks == num_blocks
