"""Data-parallel offline inference on Ray Data: one engine per replica, `map_batches` over a dataset.

`LLMPredictor` is a Ray Data stateful transform (a callable class): Ray builds it once per replica, so
the model is loaded and compiled once, then calls it on batches of rows. A row holds its prompt as text
in a `prompt` column or as token ids in a `prompt_token_ids` column, and may hold its own sampling
settings in `temperature`, `top_p`, `top_k`, `max_tokens` and `ignore_eos` columns; a missing column or
a null value takes the SamplingParams given at construction. Every row comes back with its columns plus
`generated_text`, `generated_token_ids` and `error`: None, or why that row was not generated (a bad row
is reported in its own row and never fails the batch).

`map_llm` applies it to a Dataset with a fixed pool of N replicas, each reserving `tensor_parallel_size`
GPUs (on a cluster without GPUs: one CPU each, with JAX on CPU); `run_ray_data` does that over a list of
prompts or a Dataset and returns the rows in input order. Ray Data's actor pool replaces a replica that
dies and retries its batches (its defaults for actor pools: `max_restarts=-1`, `max_task_retries=-1`),
so a lost replica loses no row and duplicates none; a retried batch is generated again from scratch.

Ray is imported only inside these functions: the package imports without it (`pip install
nanovllm-jax[ray]`).
"""

import math
from collections.abc import Sequence

import numpy as np

from nanovllm_jax.sampling_params import SamplingParams

PROMPT_COLUMNS = ("prompt", "prompt_token_ids")
# Per-row sampling columns and how a value is read (numpy scalars to Python types SamplingParams accepts).
SAMPLING_COLUMNS = ("temperature", "top_p", "top_k", "max_tokens", "ignore_eos")
OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "error")
ROW_INDEX = "__nanovllm_row_index"  # carried through a list's rows, so the driver can restore their order


def _is_null(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _read_setting(name: str, value):
    """A sampling column's value as the Python type SamplingParams checks for; bad values raise."""
    if name in ("temperature", "top_p"):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        return float(value)
    if name in ("top_k", "max_tokens"):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if not float(value).is_integer():  # a float column (nulls make ints float) holding a whole number
            raise ValueError(f"{name} must be an int, got {value!r}")
        return int(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"ignore_eos must be a bool, got {value!r}")
    return bool(value)


def _read_prompt(value) -> str | list[int]:
    """A prompt cell as the engine takes it: text, or a list of int token ids (from a list or an array)."""
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple, np.ndarray)):
        ids = list(value.tolist() if isinstance(value, np.ndarray) else value)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError("prompt_token_ids must hold ints")
        return ids
    raise TypeError(f"a prompt must be text or a list of token ids, got {type(value).__name__}")


class LLMPredictor:
    """A Ray Data callable class: one engine per replica, `__call__(batch) -> batch` with the outputs added.

    Args:
        model: the model directory, as `LLM(model)`.
        sampling_params: the defaults for rows without their own sampling columns (SamplingParams()).
        engine_kwargs: keyword arguments of `LLM` (max_num_seqs, tensor_parallel_size, ...).
        prompt_column: read prompts from this column only; by default a row's `prompt` if it has one
            (not null), else its `prompt_token_ids`.
    """

    def __init__(
        self,
        model: str,
        sampling_params: SamplingParams | None = None,
        engine_kwargs: dict | None = None,
        prompt_column: str | None = None,
    ):
        from nanovllm_jax import LLM

        self.defaults = sampling_params or SamplingParams()
        self.prompt_column = prompt_column
        self.llm = LLM(model, **(engine_kwargs or {}))

    def _row_request(self, batch: dict, i: int) -> tuple[list[int], SamplingParams]:
        """Row i's (token ids, SamplingParams), checked as the engine would; raises ValueError/TypeError."""
        columns = [self.prompt_column] if self.prompt_column else [c for c in PROMPT_COLUMNS if c in batch]
        if not columns:
            raise KeyError(f"no prompt column: the batch has {sorted(batch)}, expected one of {PROMPT_COLUMNS}")
        values = [batch[c][i] for c in columns]
        value = next((v for v in values if not _is_null(v)), None)
        if value is None:
            raise ValueError(f"no prompt in column(s) {columns}")
        prompt = _read_prompt(value)
        # Text is tokenized here as generate() would, so the checks below see the token ids it would run.
        ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.llm.model_runner.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if len(ids) > self.llm.config.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens is longer than max_model_len={self.llm.config.max_model_len}"
            )
        settings = {
            name: _read_setting(name, batch[name][i])
            for name in SAMPLING_COLUMNS
            if name in batch and not _is_null(batch[name][i])
        }
        params = SamplingParams(**(vars(self.defaults) | settings)) if settings else self.defaults
        return ids, params

    def __call__(self, batch: dict) -> dict:
        num_rows = len(next(iter(batch.values())))
        texts, token_ids, errors = [""] * num_rows, [[] for _ in range(num_rows)], [None] * num_rows
        requests = {}  # row -> (token ids, SamplingParams) of the rows that passed the checks
        for i in range(num_rows):
            try:
                requests[i] = self._row_request(batch, i)
            except (TypeError, ValueError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
        rows = list(requests)
        try:
            prompts, params = [requests[i][0] for i in rows], [requests[i][1] for i in rows]
            outputs = self.llm.generate(prompts, params, use_tqdm=False) if rows else []
        except (TypeError, ValueError):
            # A check the engine makes and the ones above missed: the engine validates a whole call before it
            # changes any state, so run the rows one at a time to find the bad ones (slow, but only then).
            outputs = []
            for i in rows:
                try:
                    outputs.append(self.llm.generate([requests[i][0]], requests[i][1], use_tqdm=False)[0])
                except (TypeError, ValueError) as e:
                    errors[i] = f"{type(e).__name__}: {e}"
                    outputs.append({"text": "", "token_ids": []})
        for i, out in zip(rows, outputs):
            texts[i], token_ids[i] = out["text"], list(out["token_ids"])
        return dict(batch) | {"generated_text": texts, "generated_token_ids": token_ids, "error": errors}


def map_llm(
    dataset,
    model: str,
    sampling_params: SamplingParams | None = None,
    *,
    num_replicas: int = 1,
    batch_size: int = 256,
    prompt_column: str | None = None,
    device: str = "auto",
    predictor_cls: type = LLMPredictor,
    wait_for_replicas_s: int = 1800,
    map_batches_kwargs: dict | None = None,
    **engine_kwargs,
):
    """`dataset.map_batches` with a fixed pool of `num_replicas` engines: the lazy Dataset, in input order.

    device: "gpu" reserves `tensor_parallel_size` GPUs per replica; "cpu" one CPU per replica and runs
    JAX on CPU in it; "auto" picks "gpu" when the Ray cluster has that many GPUs. No batch starts until
    every replica has built its engine (else the first one up takes the first batches while the others
    compile); the job fails if they are not all up within `wait_for_replicas_s` (too few GPUs, say).
    `map_batches_kwargs` goes to `map_batches` last (e.g. `{"max_restarts": 0}` turns off Ray Data's
    actor restarts).
    """
    import ray
    import ray.data

    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    if device == "auto":
        device = "gpu" if ray.cluster_resources().get("GPU", 0) >= tp else "cpu"
    if device == "gpu":
        resources = dict(num_gpus=tp)
    elif device == "cpu":
        env = {"JAX_PLATFORMS": "cpu"}
        if tp > 1:  # tensor parallelism over fake CPU devices
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={tp}"
        resources = dict(num_cpus=1, num_gpus=0, runtime_env={"env_vars": env})
    else:
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    mapped = dataset.map_batches(
        predictor_cls,
        fn_constructor_kwargs=dict(
            model=model, sampling_params=sampling_params, engine_kwargs=engine_kwargs, prompt_column=prompt_column
        ),
        batch_size=batch_size,
        batch_format="numpy",
        # One batch in flight per replica: a free replica takes the next batch (the engine runs one at a time).
        compute=ray.data.ActorPoolStrategy(size=num_replicas, max_tasks_in_flight_per_actor=1),
        udf_modifying_row_count=False,
        **resources,
        **(map_batches_kwargs or {}),
    )
    # NOTE: the DataContext is the one `dataset` carries (map_batches shares it), so these settings apply
    # to `dataset` too from now on; they cost it some speed, never correctness.
    mapped.context.execution_options.preserve_order = True  # rows in input order
    mapped.context.wait_for_min_actors_s = wait_for_replicas_s
    return mapped


def run_ray_data(
    model: str,
    prompts,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    num_replicas: int = 1,
    batch_size: int | None = None,
    prompt_column: str | None = None,
    device: str = "auto",
    predictor_cls: type = LLMPredictor,
    wait_for_replicas_s: int = 1800,
    map_batches_kwargs: dict | None = None,
    use_tqdm: bool = False,
    **engine_kwargs,
) -> list[dict]:
    """Generates over `num_replicas` engines on Ray Data; starts a local Ray if none is connected.

    `prompts` is a list (of text or token-id lists, as `LLM.generate`; `sampling_params` one SamplingParams
    or one per prompt) or a `ray.data.Dataset` (its columns as `LLMPredictor` reads them). A list gives
    `[{"text", "token_ids", "error"}]` in its order (error None, or why the prompt was not generated);
    a Dataset gives its rows, in order, with `generated_text`, `generated_token_ids` and `error` added.
    `batch_size` (rows per engine call) defaults to 256, and for a list to at most an equal share per
    replica. Other keyword arguments go to `LLM`.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    is_list = isinstance(prompts, (list, tuple))
    if is_list and not prompts:
        return []
    if is_list:
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            per_row, sampling_params = list(sampling_params), None
        else:
            per_row = None
        # Text and token-id prompts go in their own columns (null in the other one where both are used).
        has_text = any(isinstance(p, str) for p in prompts)
        has_ids = any(not isinstance(p, str) for p in prompts)
        rows = []
        for i, prompt in enumerate(prompts):
            row = {ROW_INDEX: i}
            if has_text:
                row["prompt"] = prompt if isinstance(prompt, str) else None
            if has_ids:
                row["prompt_token_ids"] = None if isinstance(prompt, str) else list(prompt)
            if per_row is not None:
                row |= vars(per_row[i])
            rows.append(row)
        if batch_size is None:
            batch_size = max(1, min(256, math.ceil(len(rows) / num_replicas)))
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    elif sampling_params is not None and not isinstance(sampling_params, SamplingParams):
        raise TypeError("with a Dataset, sampling_params is one SamplingParams (per-row settings are columns)")
    else:
        dataset = prompts
    mapped = map_llm(
        dataset,
        model,
        sampling_params,
        num_replicas=num_replicas,
        batch_size=batch_size or 256,
        prompt_column=prompt_column,
        device=device,
        predictor_cls=predictor_cls,
        wait_for_replicas_s=wait_for_replicas_s,
        map_batches_kwargs=map_batches_kwargs,
        **engine_kwargs,
    )
    results = []
    total = len(prompts) if is_list else None
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            columns = {name: list(values) for name, values in batch.items()}
            n = len(next(iter(columns.values())))
            results += [{name: values[i] for name, values in columns.items()} for i in range(n)]
            bar.update(n)
    for row in results:
        row["generated_token_ids"] = [int(t) for t in row["generated_token_ids"]]
        row["generated_text"] = str(row["generated_text"])
        row["error"] = None if _is_null(row["error"]) else str(row["error"])
    if not is_list:
        return results
    # preserve_order keeps the order already; the index also proves that no row was lost or repeated.
    results.sort(key=lambda row: row[ROW_INDEX])
    if [row[ROW_INDEX] for row in results] != list(range(len(prompts))):
        raise RuntimeError(f"Ray Data returned {len(results)} rows for {len(prompts)} prompts, not one each")
    return [{"text": r["generated_text"], "token_ids": r["generated_token_ids"], "error": r["error"]} for r in results]
