"""The API reference's FastAPI example, safe under concurrent requests: one engine thread batches them all.

The engine is single-threaded host code, so it must never be entered from two threads at once. Here
only one thread ever touches it: request handlers put (prompt, params, future) on a queue and await
the future; the engine thread adds every queued request with `add_request` and runs `step` while
anything is unfinished, so concurrent requests share prefill and decode steps (continuous batching)
instead of queueing behind a lock. A request that the engine rejects (empty prompt, too long, ...)
gets HTTP 400; the others are unaffected.

    python examples/server.py --model ~/huggingface/Qwen3-0.6B/ --port 8000
    NANOVLLM_MODEL=/path/to/model uvicorn examples.server:app
    curl -X POST localhost:8000/generate -H 'content-type: application/json' -d '{"prompt": "Hello"}'

Without a model (no --model, no NANOVLLM_MODEL) a tiny random checkpoint is used: gibberish text.
"""

import argparse
import asyncio
import os
import queue
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from nanovllm_jax import SamplingParams


class GenerationRequest(BaseModel):
    prompt: str
    temperature: float = 0.7
    max_tokens: int = 100


class EngineThread:
    """The one thread that runs the engine; `submit` is safe to call from any thread."""

    def __init__(self, llm):
        self.llm = llm
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="nanovllm-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: str, params: SamplingParams) -> Future:
        """Queues one request; the future resolves to {"text", "token_ids"} or to the engine's error."""
        future: Future = Future()
        with self.lock:  # NOTE: with _fail's lock, no request can be queued after the final drain
            if self.error is not None:
                future.set_exception(RuntimeError(f"the engine thread stopped: {self.error!r}"))
            else:
                self.requests.put((prompt, params, future))
        return future

    def close(self):
        self.requests.put(None)
        self.thread.join()

    def _loop(self):
        pending: dict[int, Future] = {}  # seq_id -> its request's future
        try:
            while True:
                # Idle: block for the next request. Busy: take whatever arrived, then step.
                items = [self.requests.get()] if not pending else []
                while not self.requests.empty():
                    items.append(self.requests.get())
                for item in items:
                    if item is None:
                        return
                    prompt, params, future = item
                    # NOTE: once running, a future cannot be cancelled, so setting its result never fails.
                    if not future.set_running_or_notify_cancel():
                        continue  # the request was cancelled while queued
                    try:
                        pending[self.llm.add_request(prompt, params)] = future
                    except Exception as e:  # a bad request; add_request checks it before any state changes
                        future.set_exception(e)
                if pending:
                    outputs, _ = self.llm.step()
                    for seq_id, token_ids in outputs:
                        text = self.llm.tokenizer.decode(token_ids, skip_special_tokens=True)
                        pending.pop(seq_id).set_result({"text": text, "token_ids": token_ids})
        except BaseException as e:  # the engine itself failed: fail every waiting request, accept no more
            self._fail(e, pending.values())
            raise

    def _fail(self, error: BaseException, futures):
        with self.lock:
            self.error = error
            for future in futures:
                future.set_exception(error)
            while not self.requests.empty():
                item = self.requests.get()
                if item is not None and item[2].set_running_or_notify_cancel():
                    item[2].set_exception(error)


def create_app(llm) -> FastAPI:
    """The FastAPI app over `llm`, which it then owns: nothing else may call `llm` while it runs."""
    engine = EngineThread(llm)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine

    @app.post("/generate")
    async def generate_text(request: GenerationRequest):
        try:
            sampling_params = SamplingParams(temperature=request.temperature, max_tokens=request.max_tokens)
            output = await asyncio.wrap_future(engine.submit(request.prompt, sampling_params))
        except (ValueError, TypeError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        return {"generated_text": output["text"]}

    return app


def build_llm(model: str | None = None, **engine_kw):
    from nanovllm_jax import LLM

    if model is None:
        from nanovllm_jax.utils.checkpoint import make_checkpoint

        model = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_jax", "random-tiny-float32")
        if not os.path.isfile(os.path.join(model, "config.json")):
            make_checkpoint(model, "tiny")
        print(f"model: tiny random Qwen3 checkpoint at {model} (random weights: the text is gibberish)")
        engine_kw = dict(max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=1024) | engine_kw
    return LLM(model, **engine_kw)


def __getattr__(name):
    # `uvicorn examples.server:app`: the app (and its LLM) is built on first access, from NANOVLLM_MODEL.
    if name == "app":
        global app
        app = create_app(build_llm(os.environ.get("NANOVLLM_MODEL")))
        return app
    raise AttributeError(name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=os.environ.get("NANOVLLM_MODEL"),
        help="a Hugging Face Qwen3 directory (default: $NANOVLLM_MODEL, else a tiny random checkpoint)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    import uvicorn

    engine_kw = {
        k: v
        for k, v in dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len).items()
        if v is not None
    }
    llm = build_llm(args.model, enforce_eager=args.enforce_eager, **engine_kw)
    uvicorn.run(create_app(llm), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
