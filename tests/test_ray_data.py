"""Ray Data integration on CPU: two replicas on a local Ray, against one engine's greedy output.

A local Ray (started here, shut down at the end) runs two replicas, each a worker process that imports JAX
and builds the tiny engine. Checked: every row equals a single engine's greedy output, in input order
(from a list and from a Dataset); a replica that dies mid-job is replaced and its batch retried, with no
row lost or repeated; a bad row (an empty prompt) is reported in its `error` column and the job goes on.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.integrations.ray_data import LLMPredictor

pytestmark = [
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),  # ray.init starts Ray's processes (fork+exec)
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024, num_kvcache_blocks=64, enforce_eager=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


class CrashOnce(LLMPredictor):
    """Exits its process on the batch holding row `crash_id` while the `flag` file exists (removed first)."""

    flag: str | None = None
    crash_id = 5

    def __call__(self, batch):
        if self.crash_id in batch["id"] and os.path.exists(self.flag):
            os.remove(self.flag)
            os._exit(1)
        return super().__call__(batch)


def test_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None; import nanovllm_jax.integrations.ray_data as m; print(m.map_llm)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def objects(values):
    """A numpy object column, as Ray Data hands over nullable or ragged columns."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def test_predictor_reads_row_settings_and_reports_bad_rows(model, reference):
    """The transform alone (no Ray): per-row settings over the defaults, nulls, and one error per bad row."""
    predictor = LLMPredictor(model, SamplingParams(temperature=0.0, max_tokens=5), ENGINE)
    nan = float("nan")
    batch = {
        "id": np.arange(6),
        "prompt": objects(["Hello, how are you?", None, None, None, "abc", "abc"]),
        "prompt_token_ids": objects([None, np.array([5, 6, 7]), np.array([5000]), np.ones(1100, int), None, None]),
        "max_tokens": np.array([3, nan, nan, nan, nan, nan]),  # nulls make an int column float
        "temperature": np.array([nan, nan, nan, nan, -1.0, nan]),
        "top_k": np.array([nan, nan, nan, nan, nan, 2.5]),
    }
    out = predictor(batch)
    assert list(out["id"]) == list(range(6))  # the input columns pass through
    expected = reference(
        ["Hello, how are you?", [5, 6, 7]],
        [SamplingParams(temperature=0.0, max_tokens=3), SamplingParams(temperature=0.0, max_tokens=5)],
    )
    assert out["generated_token_ids"][:2] == expected and out["error"][:2] == [None, None]
    assert "token ids must be in [0, 1000)" in out["error"][2]
    assert "longer than max_model_len=1024" in out["error"][3]
    assert "temperature must be >= 0" in out["error"][4]
    assert "top_k must be an int" in out["error"][5]
    assert out["generated_token_ids"][2:] == [[]] * 4 and out["generated_text"][2:] == [""] * 4


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    import ray
    import ray.cloudpickle
    import ray.data

    # The workers cannot import this test module: send its classes (CrashOnce) by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(checkpoint):
    return checkpoint("tiny")


@pytest.fixture(scope="module")
def reference(model):
    llm = LLM(model, **ENGINE)
    return lambda prompts, params: [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]


PROMPTS = [
    "Hello, how are you?",
    [5, 6, 7, 8, 9],
    "What is machine learning?",
    "",  # empty: reported in its row
    [11, 12],
    "Explain quantum computing in simple terms.",
    [1] * 40,
    "The quick brown fox",
    [300, 200, 100],
]


def test_list_matches_single_engine_in_order(ray_cluster, model, reference):
    from nanovllm_jax.integrations.ray_data import run_ray_data

    params = [SamplingParams(temperature=0.0, max_tokens=3 + i % 4) for i in range(len(PROMPTS))]
    outputs = run_ray_data(model, PROMPTS, params, num_replicas=2, batch_size=2, device="cpu", **ENGINE)
    assert len(outputs) == len(PROMPTS)
    good = [i for i, p in enumerate(PROMPTS) if len(p)]
    expected = reference([PROMPTS[i] for i in good], [params[i] for i in good])
    assert [outputs[i]["token_ids"] for i in good] == expected
    assert all(outputs[i]["error"] is None and len(outputs[i]["token_ids"]) == params[i].max_tokens for i in good)
    bad = outputs[PROMPTS.index("")]
    assert bad["token_ids"] == [] and bad["text"] == "" and "empty prompt" in bad["error"]


def test_dataset_replica_killed_midway_loses_and_repeats_nothing(ray_cluster, model, reference, tmp_path):
    import ray.data

    from nanovllm_jax.integrations.ray_data import run_ray_data

    prompts = [[(7 * i + j) % 900 + 1 for j in range(3 + i % 5)] for i in range(12)]
    max_tokens = [4 + i % 3 for i in range(12)]
    rows = [{"id": i, "prompt_token_ids": p, "max_tokens": m} for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    CrashOnce.flag = str(tmp_path / "crash-once")
    open(CrashOnce.flag, "w").close()
    dataset = ray.data.from_items(rows, override_num_blocks=6)
    out = run_ray_data(
        model, dataset, GREEDY, num_replicas=2, batch_size=2, device="cpu", predictor_cls=CrashOnce, **ENGINE
    )
    assert not os.path.exists(CrashOnce.flag), "the replica never reached the batch it was to die on"
    assert [row["id"] for row in out] == list(range(12))  # in order, each row once
    expected = reference(prompts, [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens])
    assert [row["generated_token_ids"] for row in out] == expected
    assert all(row["error"] is None for row in out)
