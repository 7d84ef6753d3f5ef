"""LLMEngine: the documented `LLM` API over the scheduler and the model runner.

Requests are validated completely before any state changes, so a bad prompt raises a clear
ValueError/TypeError and leaves the engine usable.

Async scheduling: while a decode step runs on the device, the next decode step is scheduled and
launched before the running step's tokens are read (`Scheduler.schedule_ahead`), so the host's work
per step (reading tokens, post-processing, scheduling, packing inputs) overlaps the device's.
`step()` returns the results of one step, as without it.
"""

import json
import os
from time import perf_counter

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm_jax.config import Config
from nanovllm_jax.engine.model_runner import ModelRunner
from nanovllm_jax.engine.scheduler import Scheduler
from nanovllm_jax.engine.sequence import Sequence
from nanovllm_jax.sampling_params import SamplingParams


class LLMEngine:
    def __init__(
        self,
        model: str,
        max_num_batched_tokens: int = 16384,
        max_num_seqs: int = 512,
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        kvcache_block_size: int = 256,
        num_kvcache_blocks: int = -1,
        *,
        seed: int = 0,
    ):
        self.config = Config(
            model,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            kvcache_block_size=kvcache_block_size,
            num_kvcache_blocks=num_kvcache_blocks,
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.eos_ids = eos_token_ids(self.config, self.tokenizer)
        self.model_runner = ModelRunner(self.config, seed)
        self.scheduler = Scheduler(self.config, self.eos_ids, self.model_runner.num_blocks)
        self.async_scheduling = True  # False: each step is scheduled after the previous one's tokens are in
        self.in_flight = None  # (seqs, is_prefill, num_tokens, handle) of the step launched, not yet read

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queues one request; returns its seq_id (the id `step()` reports it under)."""
        seq = self._make_sequence(prompt, sampling_params)
        self.scheduler.add(seq)
        return seq.seq_id

    def _make_sequence(self, prompt, sampling_params) -> Sequence:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
            vocab = self.model_runner.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids must be in [0, {vocab}); got {bad[:5]}")
        else:
            raise TypeError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("empty prompt: give at least one token")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(
                f"prompt of {len(token_ids)} tokens is longer than max_model_len={self.config.max_model_len}; "
                f"shorten it or raise max_model_len (this model allows up to "
                f"{self.config.hf_config.max_position_embeddings})"
            )
        return Sequence(token_ids, sampling_params, self.config.kvcache_block_size)

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """One scheduler step: (finished [(seq_id, completion token ids)], tokens: + prefill / - decode)."""
        if self.in_flight is None:
            if self.scheduler.is_finished():
                return [], 0
            self.in_flight = self._launch(*self.scheduler.schedule())
        seqs, is_prefill, num_tokens, handle = self.in_flight
        self.in_flight = None
        if self.async_scheduling and not is_prefill:
            ahead = self.scheduler.schedule_ahead(seqs)
            if ahead:
                self.in_flight = self._launch(ahead, False, prev=seqs)
        finished = self.scheduler.postprocess(seqs, self.model_runner.collect(handle))
        return [(s.seq_id, s.completion_token_ids) for s in finished], num_tokens

    def _launch(self, seqs, is_prefill, prev=None):
        num_tokens = sum(s.num_scheduled_tokens for s in seqs) if is_prefill else -len(seqs)
        return seqs, is_prefill, num_tokens, self.model_runner.dispatch(seqs, is_prefill, prev)

    def is_finished(self) -> bool:
        return self.in_flight is None and self.scheduler.is_finished()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str or of token-id lists, got {type(prompts).__name__}")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                    "pass one SamplingParams or one per prompt"
                )
        else:
            sampling_params = [sampling_params] * len(prompts)
        if not self.is_finished():
            raise RuntimeError(
                "generate() called while requests queued with add_request() are unfinished; "
                "run step() until is_finished() first"
            )
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]  # all checked first
        for seq in seqs:
            self.scheduler.add(seq)
        order = {seq.seq_id: i for i, seq in enumerate(seqs)}
        results: list[list[int] | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        while not self.is_finished():
            t = perf_counter()
            outputs, num_tokens = self.step()
            dt = perf_counter() - t
            if num_tokens > 0:
                prefill_tps = num_tokens / dt
            else:
                decode_tps = -num_tokens / dt
            bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
            for seq_id, token_ids in outputs:
                results[order[seq_id]] = token_ids
                bar.update(1)
        bar.close()
        return [{"text": self.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids} for ids in results]


def eos_token_ids(config: Config, tokenizer) -> set[int]:
    """EOS ids: `config.eos` if set, else generation_config.json's eos_token_id (one id or a list),
    else the model config's, else the tokenizer's."""
    if config.eos != -1:
        return {config.eos}
    path = os.path.join(config.model, "generation_config.json")
    eos = None
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = getattr(config.hf_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
