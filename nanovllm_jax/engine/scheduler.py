"""Continuous batching: which sequences the next step computes, and what its sampled tokens do.

A step is either a prefill step (new, chunked or re-admitted sequences, up to max_num_seqs running
and max_num_batched_tokens computed tokens, prefix-cache hits free) or a decode step (every running
sequence, one token each). A prompt longer than the remaining token budget is chunked over several
steps instead of blocking the queue. When the KV cache runs out during decode, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later (mostly from its own blocks, which stay in the prefix cache until reused).

`schedule_ahead` schedules the decode step after an in-flight one before that step's tokens are known,
so that the engine can launch it while the host post-processes the in-flight step.
"""

from collections import deque

from nanovllm_jax.config import Config
from nanovllm_jax.engine.block_manager import BlockManager
from nanovllm_jax.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: Config, eos_ids: set[int], num_blocks: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_ids = frozenset(eos_ids)
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

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
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
        if scheduled:
            return scheduled, True
        if not self.running:
            raise RuntimeError("internal error: nothing running and the first waiting sequence does not fit")

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
        return scheduled, False

    def schedule_ahead(self, seqs: list[Sequence]) -> list[Sequence] | None:
        """The decode step after the in-flight decode step of `seqs`, as `schedule` will see it once that
        step's tokens are in, or None where that is not sure to be a decode step of these sequences.

        Sequences that the in-flight step finishes by length are left out; one that it finishes by
        EOS is computed once more and its result dropped (`postprocess` skips finished sequences).
        Each gets the block for the token after its next (`ahead=1`); nothing is preempted here.
        """
        if self.waiting:  # the next step may admit them (a prefill step)
            return None
        ahead = [  # not finished yet, and not by the in-flight step's token
            s
            for s in seqs
            if not s.is_finished
            and s.num_completion_tokens + 1 < s.max_tokens
            and s.num_tokens + 1 < self.max_model_len
        ]
        new_blocks = sum(self.block_manager.needs_block(s, ahead=1) for s in ahead)
        if not ahead or new_blocks > self.block_manager.num_free_blocks:
            return None
        for seq in ahead:
            self.block_manager.may_append(seq, ahead=1)  # seq.num_scheduled_tokens stays 1
        return ahead

    def preempt(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Advance `seqs` past the step that `schedule` returned them for; `token_ids` are its samples.
        Returns the sequences this step finished. Already finished sequences are skipped: an EOS seen
        after their step was scheduled ahead (see `schedule_ahead`)."""
        finished = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            if seq.is_finished:
                continue
            self.block_manager.hash_blocks(seq)
            seq.num_cached_tokens += seq.num_scheduled_tokens
            if seq.num_cached_tokens < seq.num_tokens:
                continue  # a prefill chunk short of the last token: its sample is meaningless
            token_id = int(token_id)
            seq.append_token(token_id)
            if (
                (not seq.ignore_eos and token_id in self.eos_ids)
                or seq.num_completion_tokens >= seq.max_tokens
                or seq.num_tokens >= self.max_model_len
            ):
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                finished.append(seq)
        if finished:
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        return finished
