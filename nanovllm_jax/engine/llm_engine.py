"""LLMEngine: the documented `LLM` API over the scheduler and the model runner.

Requests are validated completely before any state changes, so a bad prompt raises a clear
ValueError/TypeError and leaves the engine usable.

Decode windows: one device call runs up to `decode_window` decode steps, sampling on the device (see
`ModelRunner`), so the host's fixed cost is paid per window instead of per token. A request that arrives
meanwhile waits for the window in flight (and for the one launched ahead of it, below) before its prefill.

Async scheduling: while a decode window runs on the device, the next window is scheduled and launched
before the running one's tokens are read (`Scheduler.schedule_ahead`), so the host's work per window
(reading tokens, post-processing, scheduling, packing updates) overlaps the device's. A prefill step
likewise has the next prefill step launched behind it (`Scheduler.schedule_prefill_ahead`). `step()`
returns the results of one step or window, as without it.
"""

import json
import numbers
import os
from time import perf_counter

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm_jax.config import Config
from nanovllm_jax.engine.model_runner import Launch, ModelRunner
from nanovllm_jax.engine.runtime import apply_runtime_defaults
from nanovllm_jax.engine.scheduler import Scheduler
from nanovllm_jax.engine.sequence import RequestOutput, Sequence
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
        decode_window: int = 8,
        kv_cache_dtype: str = "auto",
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
            decode_window=decode_window,
            kv_cache_dtype=kv_cache_dtype,
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        apply_runtime_defaults()
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.eos_ids = eos_token_ids(self.config, self.tokenizer)
        self.model_runner = ModelRunner(self.config, seed, self.eos_ids)
        self.scheduler = Scheduler(self.config, self.eos_ids, self.model_runner.num_blocks)
        self.async_scheduling = True  # False: each window is scheduled after the previous one's tokens are in
        self.in_flight: Launch | None = None  # the window launched ahead, not read yet
        self._last_step: list[tuple[Sequence, int]] = []  # (sequence, tokens it got) of the last step()
        self.stats = dict(windows=0, decode_steps=0, device_wait_s=0.0)  # for benchmarks

    @property
    def num_free_kv_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queues one request; returns its seq_id (the id `step()` reports it under)."""
        seq = self._make_sequence(prompt, sampling_params)
        self.scheduler.add(seq)
        return seq.seq_id

    def abort_request(self, seq_id: int) -> bool:
        """Drops a queued or running request and frees its KV blocks; False if it is unknown or finished.
        A decode window already in flight still computes it, and its tokens are dropped."""
        return self.scheduler.abort(seq_id) is not None

    def _make_sequence(self, prompt, sampling_params) -> Sequence:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, np.ndarray) and prompt.ndim == 1):
            token_ids = _token_ids(prompt)
            vocab = self.model_runner.vocab_size
            if token_ids and not (0 <= min(token_ids) and max(token_ids) < vocab):
                bad = [(i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab]
                raise ValueError(f"token ids must be in [0, {vocab}); got (index, id) {bad[:5]}")
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
        """One prefill step or decode window: (finished [(seq_id, completion token ids)], tokens:
        + prefill tokens computed / - tokens decoded)."""
        self._last_step = []
        if self.in_flight is None:
            if self.scheduler.is_finished():
                return [], 0
            self.in_flight = self._launch(*self.scheduler.schedule())
        launch, self.in_flight = self.in_flight, None
        if self.async_scheduling:
            self.in_flight = self._launch_ahead(launch)
        finished, num_tokens = self._postprocess(launch)
        return [(s.seq_id, s.completion_token_ids) for s in finished], num_tokens

    def _launch_ahead(self, launch: Launch) -> Launch | None:
        """Launches the step after `launch` (in flight) where the scheduler can tell it before `launch`'s
        tokens are in: a decode window after a decode window, a prefill step after a prefill step."""
        ahead = self.scheduler.schedule_prefill_ahead() if launch.is_prefill else self.scheduler.schedule_ahead()
        return ahead and self._launch(ahead[0], launch.is_prefill, ahead[1])

    def _launch(self, seqs: list[Sequence], is_prefill: bool, steps: list[int]) -> Launch:
        if is_prefill:
            launch = self.model_runner.prefill(seqs, steps)
            self.scheduler.prefill_launched(seqs)
            return launch
        launch = self.model_runner.decode(seqs, steps, max(steps))  # joining rows count no tokens in flight
        for seq, n in zip(seqs, steps):
            seq.num_inflight_tokens += n
        self.stats["windows"] += 1
        self.stats["decode_steps"] += max(steps)
        return launch

    def _postprocess(self, launch: Launch) -> tuple[list[Sequence], int]:
        t = perf_counter()
        tokens = launch.read()  # the step's one wait for the device
        self.stats["device_wait_s"] += perf_counter() - t
        if launch.is_prefill:
            finished, sampled = self.scheduler.postprocess(launch.seqs, launch.steps, tokens)
            self._last_step = [(s, 1) for s in sampled]
            return finished, launch.num_computed
        finished, added = self.scheduler.postprocess_window(launch.seqs, launch.steps, tokens)
        self._last_step = [(s, n) for s, n in zip(launch.seqs, added) if n]
        return finished, -sum(added)

    def step_outputs(self) -> list[RequestOutput]:
        """After `step()`: every request that got tokens or finished in it, with its new tokens."""
        return [
            RequestOutput(
                seq.seq_id,
                seq.completion_token_ids[-n:],
                seq.is_finished,
                seq.finish_reason,
                seq.num_prompt_tokens,
                seq.num_completion_tokens,
            )
            for seq, n in self._last_step
        ]

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
                "run step() until is_finished() first, or abort_request() them"
            )
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]  # all checked first
        for seq in seqs:
            self.scheduler.add(seq)
        order = {seq.seq_id: i for i, seq in enumerate(seqs)}
        results: list[dict | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                t = perf_counter()
                outputs, num_tokens = self.step()
                dt = perf_counter() - t
                if num_tokens > 0:
                    prefill_tps = num_tokens / dt
                else:
                    decode_tps = -num_tokens / dt
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
                for seq_id, token_ids in outputs:  # detokenized here, while the step launched ahead runs
                    text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
                    results[order[seq_id]] = {"text": text, "token_ids": token_ids}
                    bar.update(1)
        except BaseException:  # KeyboardInterrupt included: leave the engine usable
            self._abort_all([seq.seq_id for seq in seqs])
            raise
        finally:
            bar.close()
        return results

    def _abort_all(self, seq_ids: list[int]):
        """Abort these requests, wait out the window in flight, and resend the decode batch from scratch
        (an interrupted launch may have left the device's rows behind the host's map of them)."""
        for seq_id in seq_ids:
            self.abort_request(seq_id)
        if self.in_flight is not None:
            launch, self.in_flight = self.in_flight, None
            self._postprocess(launch)
        self.model_runner.batch.clear()


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


def _token_ids(prompt) -> list[int]:
    """A token-id prompt (list, tuple or 1-D array of ints) as a list of Python ints; TypeError otherwise."""
    if isinstance(prompt, np.ndarray) and prompt.dtype.kind in "iu":
        return prompt.tolist()
    if all(type(t) is int for t in prompt):  # the common case, checked without the per-element checks below
        return list(prompt)
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"a token-id prompt must hold ints; element {i} is {t!r} ({type(t).__name__})")
    return [int(t) for t in prompt]
