"""One request's host-side state: its tokens, its KV block table and how far its KV is computed.

`num_cached_tokens` counts the leading tokens whose KV is in the cache (prefix-cache hits plus
computed prefill chunks and decode steps); `num_scheduled_tokens` is how many tokens from there on
the current step computes. Between steps a sequence in decode has exactly its last token uncached.
`num_inflight_tokens` counts the tokens that launched but unread decode windows will append (fewer if
one of them samples EOS).
"""

from copy import copy
from dataclasses import dataclass
from enum import Enum, auto
from itertools import count

from nanovllm_jax.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class RequestOutput:
    """What one request got from one `step()`: its new tokens, and whether and why it finished."""

    seq_id: int
    new_token_ids: list[int]  # the EOS token included, when it ends the request
    finished: bool
    finish_reason: str | None  # "stop" (EOS), "length" (max_tokens or max_model_len), "abort", None
    num_prompt_tokens: int
    num_completion_tokens: int


class Sequence:
    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        if not token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(Sequence.counter)
        self.status = SequenceStatus.WAITING
        self.block_size = block_size
        self.token_ids = copy(token_ids)
        self.last_token = token_ids[-1]
        self.num_tokens = len(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_inflight_tokens = 0
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.admission = 0  # block tables given so far (a preempted sequence gets a new one)
        self.temperature = sampling_params.temperature
        self.top_p = sampling_params.top_p
        self.top_k = sampling_params.top_k
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    @property
    def num_cached_blocks(self) -> int:
        return self.num_cached_tokens // self.block_size

    def block(self, i: int) -> list[int]:
        assert 0 <= i < self.num_blocks, (i, self.num_blocks)
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)
        self.last_token = token_id
        self.num_tokens += 1
