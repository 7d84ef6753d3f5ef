"""An OpenAI-compatible HTTP server over one `LLM`: `python -m nanovllm_jax.serve --model PATH`.

One engine thread owns the engine (which is not thread-safe) and steps it while there is work. HTTP
handlers never call it: they queue `add`/`abort` commands, which the thread applies between steps, and
read their request's outputs (`llm.step_outputs()`) from an asyncio queue filled through
`loop.call_soon_threadsafe`. So every request joins the running batch at the next step (continuous
batching), and a client that goes away has its request aborted and its KV blocks freed.

The tokenizer is used on the event loop's thread only: prompts are tokenized in the handlers and reach
the engine as token ids, and completions are detokenized incrementally there (`IncrementalDetokenizer`).
Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (docs/API.md).
"""

import argparse
import asyncio
import json
import logging
import os
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanovllm_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
    TYPES |= {422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientDisconnected(Exception):
    pass


class IncrementalDetokenizer:
    """Text pieces of a growing list of token ids, which concatenate to `decode(ids, skip_special_tokens=True)`.

    Each call decodes a short window only: the tokens since the last piece, after the previous piece's
    tokens as context (a SentencePiece tokenizer drops a word's leading space at the start of a decode).
    Text ending in U+FFFD is held back, since the last token may end inside a multi-byte character;
    `finish` flushes what is left.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the context window starts here
        self.read_offset = 0  # the text of the tokens before this has been returned
        self.text = ""  # all text returned so far

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        piece = text[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        full = self._decode(0, len(self.token_ids))
        if full.startswith(self.text):
            piece = full[len(self.text) :]
        else:  # NOTE: only a tokenizer whose decode is not a concatenation gets here; keep what was sent
            piece = self._decode(self.prefix_offset, len(self.token_ids))
            piece = piece[len(self._decode(self.prefix_offset, self.read_offset)) :]
        self.read_offset = len(self.token_ids)
        self.text += piece
        return piece


class EngineLoop:
    """The one thread that calls the engine; `submit` and `abort` are safe to call from any thread."""

    def __init__(self, llm):
        self.llm = llm
        self.commands: queue.SimpleQueue = queue.SimpleQueue()  # ("add" | "abort", Generation), None: stop
        self.error: BaseException | None = None
        self.lock = threading.Lock()  # NOTE: with _fail's, no command is queued after the final drain
        self.thread: threading.Thread | None = None

    @property
    def healthy(self) -> bool:
        return self.error is None and self.thread is not None and self.thread.is_alive()

    def start(self):
        self.thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self.thread.start()

    def close(self, timeout: float = 60.0):
        self.commands.put(None)
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, generation: "Generation"):
        with self.lock:
            if not self.healthy:
                raise APIError(503, f"the engine is not running ({self.error!r})", code="engine_dead")
            self.commands.put(("add", generation))

    def abort(self, generation: "Generation"):
        self.commands.put(("abort", generation))

    def _run(self):
        active: dict[int, Generation] = {}  # seq_id -> its request
        seq_ids: dict[Generation, int] = {}
        error: BaseException = RuntimeError("the server is shutting down")
        try:
            while True:
                # Idle: block for the next command. Busy: apply what has arrived, then step.
                busy = bool(active) or not self.llm.is_finished()
                commands = [] if busy else [self.commands.get()]
                while True:
                    try:
                        commands.append(self.commands.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if command is None:
                        return
                    kind, generation = command
                    if kind == "add":
                        try:
                            seq_id = self.llm.add_request(generation.prompt_ids, generation.params)
                        except (ValueError, TypeError) as e:  # a bad request; the engine's state is unchanged
                            generation.deliver(APIError(400, str(e), param="prompt"))
                            continue
                        active[seq_id], seq_ids[generation] = generation, seq_id
                        generation.deliver(seq_id)
                    elif generation in seq_ids:
                        seq_id = seq_ids.pop(generation)
                        del active[seq_id]
                        self.llm.abort_request(seq_id)
                if active or not self.llm.is_finished():
                    self.llm.step()
                    for out in self.llm.step_outputs():
                        generation = active.get(out.seq_id)
                        if generation is None:
                            continue
                        if out.finished:
                            del active[out.seq_id], seq_ids[generation]
                        generation.deliver(out)
        except BaseException as e:
            logger.exception("the engine thread failed")
            error = e
        finally:
            self._fail(error, list(active.values()))

    def _fail(self, error: BaseException, generations: list["Generation"]):
        with self.lock:
            self.error = error
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                if command is not None and command[0] == "add":
                    generations.append(command[1])
        for generation in generations:
            generation.deliver(APIError(503, f"the engine stopped: {error!r}", code="engine_dead"))


class Generation:
    """One request on the event loop's side: engine outputs in, text pieces out (stop strings applied)."""

    def __init__(self, server: "Server", prompt_ids: list[int], params: SamplingParams, stop: list[str]):
        self.server, self.prompt_ids, self.params, self.stop = server, prompt_ids, params, stop
        self.loop = asyncio.get_running_loop()
        self.outputs: asyncio.Queue = asyncio.Queue()  # seq_id (added), RequestOutput, or APIError
        self.detokenizer = IncrementalDetokenizer(server.tokenizer)
        self.text = ""  # the completion's text, cut before a stop string
        self.num_sent = 0  # characters of text already returned by `pieces`
        self.num_checked = 0  # characters of text already searched for stop strings
        self.finish_reason: str | None = None
        self.started = self.closed = self.engine_finished = False

    def deliver(self, item):
        """Called by the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop has closed
            pass

    @property
    def num_completion_tokens(self) -> int:
        return len(self.detokenizer.token_ids)

    async def start(self, request: Request | None):
        """Queues the request in the engine and waits until the engine has accepted it."""
        server = self.server
        if server.num_waiting >= server.max_waiting:
            raise APIError(429, f"too many requests waiting (--max-waiting {server.max_waiting})", code="rate_limit")
        server.engine.submit(self)
        server.num_waiting += 1
        self.started = True
        await self._next(request)

    def close(self):
        """Aborts the request in the engine if it is unfinished; safe to call more than once."""
        if self.started and not self.closed:
            self.closed = True
            self.server.num_waiting -= 1
            if not self.engine_finished:  # a client gone, a stop string, or an error: free its blocks now
                self.server.engine.abort(self)  # a no-op for a request the engine did not accept

    async def _next(self, request: Request | None):
        # Without a streaming response to notice a disconnect, poll for one while waiting.
        while True:
            try:
                item = await (asyncio.wait_for(self.outputs.get(), 1.0) if request else self.outputs.get())
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientDisconnected() from None
                continue
            if isinstance(item, APIError):
                raise item
            return item

    async def pieces(self, request: Request | None = None) -> AsyncIterator[str]:
        """The completion's text, piece by piece, until `finish_reason` is set: one piece per engine output
        that brought tokens, "" where they bring no text yet (as vLLM streams), so a client sees every step."""
        while self.finish_reason is None:
            out = await self._next(request)
            text = self.detokenizer.add(out.new_token_ids)
            if out.finished:
                text += self.detokenizer.finish()
                self.finish_reason, self.engine_finished = out.finish_reason, True
            self.text += text
            hold = 0
            if self.stop:
                longest = max(map(len, self.stop))
                start = max(0, self.num_checked - longest + 1)
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.text, self.finish_reason = self.text[: min(hits)], "stop"
                elif self.finish_reason is None:  # hold back what may be the start of a stop string
                    hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
                self.num_checked = len(self.text)
            end = max(self.num_sent, len(self.text) - hold)
            piece, self.num_sent = self.text[self.num_sent : end], end
            if piece or out.new_token_ids:
                yield piece

    def usage(self) -> dict:
        n, m = len(self.prompt_ids), self.num_completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


# Request bodies. Strict types: a wrong type is a 422, as OpenAI's API answers; unknown fields are ignored.
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extras: top_k (0 or -1 disables it) and ignore_eos
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    seed: int | None = None
    # Accepted at their defaults only (400 otherwise): this engine has no logprobs or penalties.
    logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None


class CompletionRequest(CommonRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: Any = None
    tools: Any = None
    response_format: Any = None


UNSUPPORTED_DEFAULTS = dict(
    logprobs=(None, False),
    top_logprobs=(None, 0),
    presence_penalty=(None, 0, 0.0),
    frequency_penalty=(None, 0, 0.0),
    logit_bias=(None, {}),
    echo=(None, False),
    best_of=(None, 1),
    suffix=(None, ""),
    tools=(None, []),
)


class Server:
    """What the handlers share: the engine loop, the tokenizer and the limits."""

    def __init__(self, llm, served_model_name: str | None, api_key: str | None, max_waiting: int):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.config.max_model_len
        self.model_name = served_model_name or os.path.basename(os.path.normpath(llm.config.model))
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.num_waiting = 0  # requests accepted and not finished (read and written on the event loop only)
        self.engine = EngineLoop(llm)
        self.created = int(time.time())

    def sampling_params(self, body: CommonRequest, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
        if body.model is not None and body.model != self.model_name:
            raise APIError(400, f"model {body.model!r} does not exist; this server serves {self.model_name!r}", "model")
        for name, defaults in UNSUPPORTED_DEFAULTS.items():
            if getattr(body, name, None) not in defaults:
                raise APIError(400, f"{name} is not supported by this server", name)
        if getattr(body, "response_format", None) not in (None, {"type": "text"}):
            raise APIError(400, "response_format is not supported by this server", "response_format")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: one completion per request", "n")
        if body.seed is not None:
            raise APIError(400, "seed is not supported: the engine has one sampling stream for all requests", "seed")
        if "" in ([body.stop] if isinstance(body.stop, str) else body.stop or []):
            raise APIError(400, "stop strings must not be empty", "stop")
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=-1 if body.top_k in (None, 0) else body.top_k,
                max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                ignore_eos=body.ignore_eos,
            )
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from e

    async def generate(self, request: Request, body: CommonRequest, prompt_ids, params, chunk, final, usage_chunk):
        """Runs one request: a JSON response, or server-sent events if `body.stream`.

        chunk(generation, piece) -> the stream's chunks for a piece of text (None: the opening ones);
        final(generation, streamed) -> the stream's last chunk, or the whole response; usage_chunk(generation).
        """
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        generation = Generation(self, prompt_ids, params, stop)
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events():
            try:
                for item in chunk(generation, None):
                    yield sse(item, include_usage)
                async for piece in generation.pieces():
                    for item in chunk(generation, piece):
                        yield sse(item, include_usage)
                yield sse(final(generation, streamed=True), include_usage)
                if include_usage:
                    yield sse(usage_chunk(generation))
                yield "data: [DONE]\n\n"
            except APIError as e:  # the engine stopped mid-stream
                yield sse(e.body())
            finally:  # also on a client's disconnect, which cancels this generator
                generation.close()

        streaming = False
        try:
            await generation.start(None if body.stream else request)
            if body.stream:
                streaming = True
                return EventStream(events(), generation.close)
            async for _ in generation.pieces(request):
                pass
            return final(generation)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not streaming:
                generation.close()


class EventStream(StreamingResponse):
    """Server-sent events that close their request however the response ends.

    NOTE: a generator cancelled before its first item never runs its `finally`, and an ASGI 2.4 server
    reports a disconnect by failing `send` without closing the generator: `on_close` covers both."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(item: dict, include_usage: bool = False) -> str:
    if include_usage and "usage" not in item and "error" not in item:
        item["usage"] = None
    return f"data: {json.dumps(item, ensure_ascii=False)}\n\n"


def create_app(llm, served_model_name: str | None = None, api_key: str | None = None, max_waiting: int = 1024):
    """The FastAPI app over `llm`, which it then owns: nothing else may call `llm` while the app runs."""
    server = Server(llm, served_model_name, api_key, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.close)

    app = FastAPI(title="nanovllm-jax", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        locs = [[str(p) for p in err["loc"] if p != "body"] for err in e.errors()] or [[]]
        param = os.path.commonprefix(locs)  # a union's errors name its members after the field: drop them
        message = "; ".join(f"{'.'.join(loc) or 'body'}: {err['msg']}" for loc, err in zip(locs, e.errors()))
        return APIError(422, message or "invalid request body", ".".join(param) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        logger.exception("internal error")
        return APIError(500, f"internal error: {e!r}").response()

    def check_api_key(request: Request):
        if server.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    def check_engine():
        if not server.engine.healthy:
            raise APIError(503, f"the engine is not running ({server.engine.error!r})", code="engine_dead")

    auth = [Depends(check_api_key), Depends(check_engine)]

    @app.get("/health")
    async def health():
        check_engine()
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models():
        card = dict(id=server.model_name, object="model", created=server.created, owned_by="nanovllm-jax")
        return {"object": "list", "data": [card | {"max_model_len": server.max_model_len}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        params = server.sampling_params(body, body.max_tokens, 16)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        prompt_ids = server.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = dict(id=rid, object="text_completion", created=created, model=server.model_name)

        def chunk(g, piece):
            return [] if piece is None else [head | {"choices": [choice(piece, None)]}]

        def choice(text, finish_reason):
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        def final(g, streamed=False):
            if streamed:
                return head | {"choices": [choice("", g.finish_reason)]}
            return head | {"choices": [choice(g.text, g.finish_reason)], "usage": g.usage()}

        return await server.generate(
            request, body, prompt_ids, params, chunk, final, lambda g: head | {"choices": [], "usage": g.usage()}
        )

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts are supported", "messages")
                content = "\n".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = server.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # no template, or the template rejected the messages (its own exception types)
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from e
        prompt_ids = server.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = server.sampling_params(body, max_tokens, max(1, server.max_model_len - len(prompt_ids)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = dict(id=rid, object="chat.completion.chunk", created=created, model=server.model_name)

        def chunk(g, piece):
            delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
            return [head | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}]

        def final(g, streamed=False):
            if streamed:
                return head | {
                    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": g.finish_reason}]
                }
            message = {"role": "assistant", "content": g.text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": g.finish_reason}
            return head | {"object": "chat.completion", "choices": [choice], "usage": g.usage()}

        return await server.generate(
            request, body, prompt_ids, params, chunk, final, lambda g: head | {"choices": [], "usage": g.usage()}
        )

    return app


TINY_DEFAULTS = dict(max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=1024)


def build_llm(model: str | None = None, **engine_kw):
    """`LLM(model, **engine_kw)`; without a model, a tiny random checkpoint (cached) with small defaults."""
    from nanovllm_jax import LLM

    if model is None:
        from nanovllm_jax.utils.checkpoint import make_checkpoint

        model = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_jax", "tiny-qwen3")
        if not os.path.isfile(os.path.join(model, "config.json")):
            make_checkpoint(model, "tiny")
        print(f"model: tiny random Qwen3 checkpoint at {model} (random weights: the text is gibberish)")
        engine_kw = TINY_DEFAULTS | engine_kw
    return LLM(model, **engine_kw)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="An OpenAI-compatible server over nanovllm-jax (docs/API.md).")
    p.add_argument("--model", help="a Hugging Face Qwen3 directory (default: a tiny random checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model's name in the API (default: the model path's basename)")
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"), help="default: $NANOVLLM_API_KEY")
    p.add_argument("--max-waiting", type=int, default=1024, help="unfinished requests beyond this get HTTP 429")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kvcache-block-size", type=int)
    p.add_argument("--num-kvcache-blocks", type=int)
    p.add_argument("--seed", type=int, help="the engine's sampling seed (default 0)")
    p.add_argument("--decode-window", type=int, help="decode steps per device call, at most (default 8)")
    p.add_argument("--kv-cache-dtype", help='"auto" (the model\'s dtype, default) or "fp8"')
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.max_waiting < 1:
        p.error("--max-waiting must be >= 1")

    import uvicorn

    names = "max_num_seqs max_num_batched_tokens max_model_len gpu_memory_utilization tensor_parallel_size"
    names += " kvcache_block_size num_kvcache_blocks seed decode_window kv_cache_dtype"
    engine_kw = {k: getattr(args, k) for k in names.split() if getattr(args, k) is not None}
    llm = build_llm(args.model, enforce_eager=args.enforce_eager, **engine_kw)
    app = create_app(llm, args.served_model_name, args.api_key, args.max_waiting)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
