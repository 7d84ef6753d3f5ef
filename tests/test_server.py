"""examples/server.py under concurrent requests: every response equals a sequential greedy generate.

Requests come from many threads at once, more than max_num_seqs, with different lengths, so they
queue, join running batches and finish at different steps; a bad request in the mix gets HTTP 400
and disturbs no other. The engine must be entered from one thread only, and requests must share steps.
"""

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from nanovllm_jax import LLM, SamplingParams  # noqa: E402

SERVER = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "server.py")
PROMPTS = [
    "Hello, how are you?",
    "What is machine learning?",
    "Explain quantum computing in simple terms.",
    "Write a short story about a robot.",
    "Explain photosynthesis.",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "0 1 2 3 4 5 6 7 8 9",
]
MAX_TOKENS = [5, 12, 20, 3, 16, 9, 14, 7]


def load_server():
    spec = importlib.util.spec_from_file_location("nanovllm_example_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(
        checkpoint("tiny"),
        max_num_seqs=4,
        max_num_batched_tokens=256,
        max_model_len=512,
        kvcache_block_size=256,
    )


def test_concurrent_requests_match_sequential_greedy(llm):
    expected = [
        llm.generate([p], SamplingParams(temperature=0.0, max_tokens=m), use_tqdm=False)[0]["text"]
        for p, m in zip(PROMPTS, MAX_TOKENS, strict=True)
    ]
    assert len(set(expected)) > 1  # different answers, so a mix-up of responses shows

    # Record which threads enter the engine and how many sequences each decode step batches.
    step_threads, decode_batches = set(), []
    step, dispatch = llm.step, llm.model_runner.dispatch

    def recording_step():
        step_threads.add(threading.get_ident())
        return step()

    def recording_dispatch(seqs, is_prefill, prev=None):
        if not is_prefill:
            decode_batches.append(len(seqs))
        return dispatch(seqs, is_prefill, prev)

    llm.step, llm.model_runner.dispatch = recording_step, recording_dispatch
    server = load_server()
    try:
        with TestClient(server.create_app(llm)) as client:

            def post(i):
                body = {"prompt": PROMPTS[i], "temperature": 0.0, "max_tokens": MAX_TOKENS[i]}
                return client.post("/generate", json=body)

            with ThreadPoolExecutor(len(PROMPTS) + 2) as pool:
                bad = [
                    pool.submit(client.post, "/generate", json={"prompt": "", "max_tokens": 4}),
                    pool.submit(client.post, "/generate", json={"prompt": "x", "temperature": -1.0}),
                ]
                responses = list(pool.map(post, range(len(PROMPTS))))
            for i, r in enumerate(responses):
                assert r.status_code == 200, r.text
                assert r.json() == {"generated_text": expected[i]}, (i, PROMPTS[i])
            for f in bad:
                assert f.result().status_code == 400, f.result().text
            # The server still serves after the bad requests.
            r = post(1)
            assert r.status_code == 200 and r.json() == {"generated_text": expected[1]}
    finally:
        del llm.step, llm.model_runner.dispatch  # back to the bound methods
    assert len(step_threads) == 1 and threading.get_ident() not in step_threads
    assert max(decode_batches) > 1, "concurrent requests never shared a decode step"
    assert llm.is_finished()
