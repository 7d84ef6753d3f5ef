"""nanovllm_jax.serve, the OpenAI-compatible server, over real HTTP on 127.0.0.1 with the official client.

One server per module (uvicorn in a background thread, the tiny checkpoint): greedy completions and chats,
streamed or not, equal `LLM.generate` exactly (also where a character spans several tokens); 32 concurrent
streams each get their own tokens; stop strings cut the text and free the request's blocks; a client that
goes away mid-request frees its blocks; bad requests get OpenAI-style errors (400/401/404/422/429) and the
server stays up. The references are computed before the server starts: then the engine belongs to it.
"""

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from nanovllm_jax import LLM, SamplingParams  # noqa: E402
from nanovllm_jax.serve import IncrementalDetokenizer, create_app  # noqa: E402

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024, num_kvcache_blocks=64)
NAME, KEY = "tiny", "test-key"
MAX_TOKENS = 8
WORDS = "the quick brown fox jumps over lazy dog machine learning quantum photosynthesis robot capital France story"
WORDS = (WORDS + " short explain what is how are you hello").split()
PROMPTS = [" ".join(WORDS[i : i + 1 + i % 4]) for i in range(24)] + [f"{w}{i}" for i, w in enumerate(WORDS[:8])]
MULTIBYTE = "你好 €"  # its greedy completion decodes to multi-byte characters split across tokens
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is machine learning?"}]
HEADERS = {"Authorization": f"Bearer {KEY}"}


def greedy(llm, prompt, max_tokens=MAX_TOKENS):
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)[0]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("tiny"), **SMALL)


@pytest.fixture(scope="module")
def ref(llm):
    """Sequential greedy generates of everything the tests ask the server, before the server owns the engine."""
    chat_ids = llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    outputs = {p: greedy(llm, p) for p in [*PROMPTS, MULTIBYTE]}
    return SimpleNamespace(
        prompts={p: out["text"] for p, out in outputs.items()},
        lengths={p: len(out["token_ids"]) for p, out in outputs.items()},
        ids=greedy(llm, [5, 6, 7, 8]),
        chat=greedy(llm, chat_ids),
        free_blocks=llm.num_free_kv_blocks,
    )


@pytest.fixture(scope="module")
def server(llm, ref):
    app = create_app(llm, served_model_name=NAME, api_key=KEY, max_waiting=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield SimpleNamespace(url=url, state=app.state.server, llm=llm, free_blocks=ref.free_blocks)
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


class Gate:
    """Wraps the engine's step: after `pause`, the engine thread holds before its next step until `resume`."""

    def __init__(self, llm):
        self.step, self.go, self.held = llm.step, threading.Event(), threading.Event()
        self.go.set()

    def __call__(self):
        if not self.go.is_set():
            self.held.set()
            assert self.go.wait(30)
            self.held.clear()
        return self.step()

    def pause(self, busy=True):
        self.go.clear()
        if busy:  # the engine is stepping: wait until it holds
            wait_until(self.held.is_set)

    def resume(self):
        self.go.set()


@pytest.fixture
def gate(server):
    server.llm.step = gate = Gate(server.llm)
    yield gate
    gate.resume()
    del server.llm.step  # back to the bound method


def wait_until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def wait_idle(server, timeout=15.0):
    """Waits until no request is unfinished and the KV blocks are all free again."""
    deadline = time.monotonic() + timeout
    while server.state.num_waiting or server.llm.num_free_kv_blocks != server.free_blocks:
        assert time.monotonic() < deadline, (server.state.num_waiting, server.llm.num_free_kv_blocks)
        time.sleep(0.05)


def stream_completion(client, prompt, **kw):
    chunks = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, stream=True, **kw, timeout=60))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return pieces, finish, chunks


def test_stream_has_a_chunk_for_tokens_without_text(server, client, ref):
    """Each engine output that brings tokens is a chunk, with text "" where they decode to none yet (as vLLM
    streams), so a client sees every step. The tiny checkpoint's 8 tokens after this prompt have no text."""
    prompt = PROMPTS[1]
    assert ref.prompts[prompt] == "" and ref.lengths[prompt] == MAX_TOKENS
    pieces, finish, chunks = stream_completion(client, prompt, max_tokens=MAX_TOKENS)
    steps = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert len(steps) >= 2 and set(pieces) == {""} and finish == ["length"]  # the prefill's token, then a window


def test_completion_matches_generate(server, client, ref):
    prompt = PROMPTS[0]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == ref.prompts[prompt] and r.choices[0].finish_reason == "length"
    n = len(server.llm.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 8, n + 8)

    opts = {"include_usage": True}
    pieces, finish, chunks = stream_completion(client, prompt, max_tokens=MAX_TOKENS, stream_options=opts)
    assert "".join(pieces) == ref.prompts[prompt] and finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])

    r = client.completions.create(model=NAME, prompt=[5, 6, 7, 8], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == ref.ids["text"] and r.usage.prompt_tokens == 4

    # One prompt in a list is one prompt; the raw stream ends with [DONE].
    body = {"prompt": [prompt], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    assert text == ref.prompts[prompt]


def test_multibyte_characters_stream_exactly(server, client, ref):
    expected = ref.prompts[MULTIBYTE]
    assert any(ord(ch) > 127 for ch in expected)
    pieces, _, _ = stream_completion(client, MULTIBYTE, max_tokens=MAX_TOKENS)
    assert "".join(pieces) == expected

    # Token by token: a character of several tokens comes out whole, once its last token is in.
    tokenizer = server.llm.tokenizer
    text = "héllo 你好 € 🙂 done"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([i]) for i in ids]
    pieces.append(detokenizer.finish())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1], "no character spanned several tokens"
    # An unfinished character at the end is flushed as decode() has it (U+FFFD).
    cut = tokenizer.encode("🙂")[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([i]) for i in ids[:3] + cut] + [detokenizer.finish()]
    assert "".join(pieces) == tokenizer.decode(ids[:3] + cut, skip_special_tokens=True)


def test_chat_matches_generate(server, client, ref):
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == ref.chat["text"] and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
    stream = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.chat["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_streams_get_their_own_tokens(server, client, ref):
    assert len(set(ref.prompts.values())) > 10  # different answers, so a mix-up shows

    def run(prompt):
        return "".join(stream_completion(client, prompt, max_tokens=MAX_TOKENS)[0])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(run, PROMPTS))
    assert texts == [ref.prompts[p] for p in PROMPTS]
    wait_idle(server)


def test_stop_strings(server, client, ref):
    prompt = next(p for p in PROMPTS if len(ref.prompts[p]) >= 10 and "\ufffd" not in ref.prompts[p])
    full = ref.prompts[prompt]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    pieces, finish, _ = stream_completion(client, prompt, max_tokens=MAX_TOKENS, stop=[stop, "\x07never"])
    assert ("".join(pieces), finish) == (expected, ["stop"])
    # A stop string that never completes: the text held back while it might is sent in the end.
    pieces, finish, _ = stream_completion(client, prompt, max_tokens=MAX_TOKENS, stop=full[-2:] + "\x07")
    assert ("".join(pieces), finish) == (full, ["length" if ref.lengths[prompt] == MAX_TOKENS else "stop"])
    wait_idle(server)  # the stopped requests were aborted in the engine


def test_client_disconnect_frees_blocks(server, gate):
    wait_idle(server)
    body = {"prompt": PROMPTS[2], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        gate.pause()  # the engine holds before its next step, far from the request's 900th token
        assert server.llm.num_free_kv_blocks < server.free_blocks
    wait_until(lambda: server.state.num_waiting == 0)  # the response is closed: the request is aborted
    assert server.llm.num_free_kv_blocks < server.free_blocks
    gate.resume()
    wait_idle(server)  # the engine applied the abort: the blocks are free

    # A non-streamed request whose client gives up is aborted too (the server polls for a disconnect).
    gate.pause(busy=False)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body | {"stream": False}, headers=HEADERS, timeout=0.5)
    wait_until(lambda: server.state.num_waiting == 0)
    gate.resume()
    wait_idle(server)


BAD_REQUESTS = [
    ("completions", {"prompt": ""}, 400, None),
    ("completions", {"prompt": []}, 400, None),
    ("completions", {"prompt": [7] * 1025}, 400, None),  # longer than max_model_len
    ("completions", {"prompt": [10**6]}, 400, None),  # not in the vocabulary
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 400, "model"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, None),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, None),
    ("completions", {"prompt": "hi", "top_k": -5}, 400, None),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, None),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("completions", {"prompt": "hi", "seed": 1}, 400, "seed"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"prompt": "", "stream": True}, 400, None),
    ("completions", {}, 422, "prompt"),
    ("completions", {"prompt": 5}, 422, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": "5"}, 422, "max_tokens"),
    ("completions", {"prompt": "hi", "stream": "yes"}, 422, "stream"),
    ("completions", {"prompt": "hi", "temperature": True}, 422, "temperature"),
    ("completions", "{not json", 422, None),
    ("completions", [1, 2], 422, None),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400, None),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat/completions", {"messages": "hi"}, 422, "messages"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 422, "messages.0.role"),
    ("nothing/here", {}, 404, None),
]


def test_bad_requests_get_openai_errors(server):
    with httpx.Client(base_url=f"{server.url}/v1", headers=HEADERS, timeout=60) as http:
        for path, body, status, param in BAD_REQUESTS:
            if isinstance(body, str):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
            if param is not None:
                assert error["param"] == param, (body, error)
    wait_idle(server)


def test_api_key(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "hi"}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert [m.id for m in client.models.list()] == [NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_max_waiting(server, gate):
    wait_idle(server)
    server.state.max_waiting = 2
    body = {"prompt": PROMPTS[3], "max_tokens": 4, "temperature": 0}
    gate.pause(busy=False)  # the first request is taken in, the second waits for it: both count
    try:
        with ThreadPoolExecutor(2) as pool:
            post = lambda: httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60)
            accepted = [pool.submit(post) for _ in range(2)]
            wait_until(lambda: server.state.num_waiting == 2)
            r = httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
            gate.resume()
            assert [f.result().status_code for f in accepted] == [200, 200]
    finally:
        gate.resume()
        server.state.max_waiting = 64
    wait_idle(server)
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30).status_code == 200


def test_health_after_everything(server, client, ref):
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    r = client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == ref.prompts[PROMPTS[4]]
    wait_idle(server)


class FailingEngine:
    """Stands in for an LLM whose step fails (a lost device): the server must answer 503, not hang."""

    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.config = SimpleNamespace(model=path, max_model_len=64)

    def add_request(self, prompt, sampling_params):
        return 0

    def is_finished(self):
        return True

    def step(self):
        raise RuntimeError("device lost")


def test_engine_failure_gives_503(checkpoint):
    path = checkpoint("tiny")
    with TestClient(create_app(FailingEngine(path))) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").json()["data"][0]["id"] == os.path.basename(path)  # the default name
        r = http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        assert http.get("/health").status_code == 503
        assert http.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 503
