"""Continuous batching: which sequences the next step computes, and what its sampled tokens do.

A step is either a prefill step (new, chunked or re-admitted sequences, up to max_num_seqs running
and max_num_batched_tokens computed tokens, prefix-cache hits free) or a decode window (every running
sequence, up to `decode_window` tokens each, fewer where max_tokens or max_model_len comes first; one
token each where the cache lacks the blocks for a whole window). Prefill comes first: a request that can
be admitted is, at the next step. A prompt longer than the remaining token budget is chunked over
several steps instead of blocking the queue. When the KV cache runs out during decode, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
later (mostly from its own blocks, which stay in the prefix cache until reused).

`schedule_ahead` schedules the decode window after an in-flight one before that window's tokens are
known, so that the engine can launch it while the host post-processes the in-flight one;
`schedule_prefill_ahead` does the same for the prefill step after an in-flight prefill step, whose KV
counts as computed from its launch on (`prefill_launched`).
"""

from collections import deque

from nanovllm_jax.config import Config
from nanovllm_jax.engine.block_manager import BlockManager
from nanovllm_jax.engine.decode_batch import remaining_steps
from nanovllm_jax.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: Config, eos_ids: set[int], num_blocks: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_ids = frozenset(eos_ids)
        self.decode_window = config.decode_window
        block_size = config.kvcache_block_size
        # NOTE: a sequence never holds KV for more than max_model_len tokens (it finishes on reaching
        # that length), so one max_model_len sequence alone always fits and preemption terminates.
        if num_blocks * block_size < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {block_size} tokens, fewer than one "
                f"max_model_len={config.max_model_len} sequence; lower max_model_len or give it more memory"
            )
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.unfinished: dict[int, Sequence] = {}  # seq_id -> sequence, waiting or running

    def add(self, seq: Sequence):
        self.waiting.append(seq)
        self.unfinished[seq.seq_id] = seq

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool, list[int]]:
        """(sequences, is_prefill, steps): steps are the tokens each sequence's decode window adds unless
        it samples EOS (prefill: 1 where the step reaches the end of the prompt, 0 for a chunk short of it)."""
        if prefill := self._admit():
            return prefill[0], True, prefill[1]
        if not self.running:
            raise RuntimeError("internal error: nothing running and the first waiting sequence does not fit")
        # NOTE: a window costs the GPU time of `decode_window` steps however few it decodes (its loop has a
        # static trip count), so it is cut short only where the cache lacks the blocks; a request waiting
        # here cannot be admitted before some sequence finishes anyway.
        steps = self._reserve(list(self.running), self.decode_window)
        if steps is not None:
            return list(self.running), False, steps

        # One step, preempting the newest sequences while the cache is short.
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        if not scheduled:
            raise RuntimeError("internal error: a sequence alone cannot get a KV block")
        self.running.extend(scheduled)
        return scheduled, False, [1] * len(scheduled)

    def _admit(self) -> tuple[list[Sequence], list[int]] | None:
        """A prefill step: waiting sequences in order, while the token budget, `max_num_seqs` and the cache
        allow, with `schedule`'s steps; None where none is admitted."""
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        # NOTE: at most one sequence is partially prefilled, and it is waiting[0]: a chunk uses up the
        # whole remaining budget, so the next step continues it before admitting anything, and no
        # decode step (hence no preemption) runs while it holds blocks outside `running`.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
            seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_cached_tokens, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
            if seq.num_cached_tokens + seq.num_scheduled_tokens < seq.num_tokens:
                break  # chunked: it stays at the front of `waiting`
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if not scheduled:
            return None
        return scheduled, [int(s.num_cached_tokens + s.num_scheduled_tokens == s.num_tokens) for s in scheduled]

    def prefill_launched(self, seqs: list[Sequence]):
        """Once a prefill step of `seqs` is launched, its KV counts as computed: the full blocks it fills
        are registered for prefix-cache hits and `num_cached_tokens` advances past it. Any later step
        reads the cache this one writes (the caches thread through the steps' programs in launch order),
        so the next prefill step can be scheduled, and hit these blocks, before this one's tokens are read."""
        for seq in seqs:
            self.block_manager.hash_blocks(seq)
            seq.num_cached_tokens += seq.num_scheduled_tokens

    def schedule_prefill_ahead(self) -> tuple[list[Sequence], list[int]] | None:
        """The prefill step after one in flight (see `prefill_launched`), as (sequences, steps), or None
        where no waiting prompt can be admitted yet. It may admit fewer than `schedule` would once the
        in-flight step is post-processed: its sequences that finish at their first token still hold their
        rows and blocks."""
        return self._admit()

    def schedule_ahead(self) -> tuple[list[Sequence], list[int]] | None:
        """The decode window after the in-flight one, as `schedule` will see it once the in-flight tokens
        are in, or None where that is not sure to be a decode window of the running sequences.

        Sequences that the in-flight window finishes by length are left out; one that it finishes by EOS
        is computed for nothing (it stopped on the device) and its result dropped (`postprocess_window`
        skips finished sequences). Nothing is preempted here.
        """
        if self.waiting:  # the next step may admit them (a prefill step)
            return None
        seqs = [s for s in self.running if remaining_steps(s, self.max_model_len) > 0]
        for window in dict.fromkeys((self.decode_window, 1)):
            steps = self._reserve(seqs, window) if seqs else None
            if steps is not None:
                return seqs, steps
        return None

    def _reserve(self, seqs: list[Sequence], window: int) -> list[int] | None:
        """Allocate the blocks of a `window`-step decode window of `seqs`, if the cache has them all: the
        steps of each sequence, or None (nothing allocated)."""
        steps = [min(window, remaining_steps(s, self.max_model_len)) for s in seqs]
        bm = self.block_manager
        # A window of n steps writes the KV of the last known token and of the n - 1 it samples first.
        ends = [s.num_tokens + s.num_inflight_tokens + n - 1 for s, n in zip(seqs, steps)]
        if sum(bm.blocks_to_cover(s, e) for s, e in zip(seqs, ends)) > bm.num_free_blocks:
            return None
        for seq, end, n in zip(seqs, ends, steps):
            bm.cover(seq, end)
            seq.num_scheduled_tokens = n
        return steps

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop an unfinished request: its blocks are freed and it finishes with reason "abort"."""
        seq = self.unfinished.get(seq_id)
        if seq is None:
            return None
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, "abort")
        return seq

    def _finish(self, seq: Sequence, reason: str):
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.deallocate(seq)
        del self.unfinished[seq.seq_id]

    def preempt(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], steps: list[int], token_ids) -> tuple[list[Sequence], list[Sequence]]:
        """Add the samples `token_ids` of a launched prefill step (see `prefill_launched`) of `seqs`, with
        `schedule`'s steps. Returns (the sequences this step finished, those that got a token)."""
        finished, sampled = [], []
        for seq, n, token_id in zip(seqs, steps, token_ids[: len(seqs)], strict=True):
            if seq.is_finished or not n:  # aborted while its step ran, or a chunk: its sample is meaningless
                continue
            seq.append_token(int(token_id))
            sampled.append(seq)
            if self._finish_if_done(seq):
                finished.append(seq)
        return self._drop_finished(finished), sampled

    def postprocess_window(self, seqs: list[Sequence], steps: list[int], tokens) -> tuple[list[Sequence], list[int]]:
        """Advance the rows `seqs` of a decode window past it; `tokens` [steps, rows] are its samples and
        `steps` the tokens each row was to add. Already finished sequences are skipped: an EOS seen after
        their next window was launched, or an abort. Returns (finished sequences, tokens added per row)."""
        finished, added = [], []
        for r, (seq, n) in enumerate(zip(seqs, steps)):
            seq.num_inflight_tokens -= n
            if seq.is_finished:
                added.append(0)
                continue
            new = tokens[:n, r].tolist()
            if not seq.ignore_eos:
                new = next((new[: i + 1] for i, t in enumerate(new) if t in self.eos_ids), new)
            for token_id in new:  # first, so that the blocks the window filled can be hashed
                seq.append_token(token_id)
            seq.num_scheduled_tokens = len(new)  # KV was written for the token before each new one
            self.block_manager.hash_blocks(seq)
            seq.num_cached_tokens += len(new)
            added.append(len(new))
            if self._finish_if_done(seq):
                finished.append(seq)
        return self._drop_finished(finished), added

    def _finish_if_done(self, seq: Sequence) -> bool:
        """Finish `seq` if its last token ends it. True if it finished."""
        if not seq.ignore_eos and seq.last_token in self.eos_ids:
            self._finish(seq, "stop")
        elif seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")
        return seq.is_finished

    def _drop_finished(self, finished: list[Sequence]) -> list[Sequence]:
        if finished:
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        return finished
