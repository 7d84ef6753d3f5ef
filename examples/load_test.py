"""A bounded load test of the OpenAI-compatible server (nanovllm_jax.serve) on 127.0.0.1 only.

    python examples/load_test.py --port 8000                        # a server already running
    python examples/load_test.py --start-server --levels 1 4 --max-tokens 16 --prompt-len 32
    python examples/load_test.py --start-server --model PATH --max-num-seqs 256 --json out.json

At each concurrency level C (default 1 16 64 256), N requests (default max(2C, 32)) are sent by C workers,
each starting its next request when its last one ends (httpx's async client, one connection per worker).
Each is a streamed POST /v1/completions of `--prompt-len` token ids from a seeded RNG (its own ids, the same on
every run: `--prompt-seed`; ids below `--vocab`), `--max-tokens`, `ignore_eos: true`, temperature 0 and
`stream_options: {"include_usage": true}`. One untimed request warms the server up first.

Per level: requests/s and output tokens/s (successful requests over the level's wall time); p50/p90/p99 of
the time to first token (TTFT: request sent to the first chunk of tokens) and of the inter-token latency (ITL:
each gap between successive chunks of tokens divided by the tokens it brought; one sample per gap, pooled);
and failed requests (HTTP error, error event, no `[DONE]`, timeout; `not_run`: not started within the bound).
A chunk of tokens is any chunk before the one with the finish reason: the server sends one per engine output
that brought tokens, with text "" where they decode to none yet (as vLLM does; the random checkpoints sample
ids their small tokenizer lacks). A chunk's token count is not in the stream (a decode window brings several
tokens per chunk): a request's tokens come from the final chunk's `usage.completion_tokens` (if a server sends
no usage: the number of chunks), its first chunk is taken to bring one token (the prefill's) and the other
chunks share the rest evenly. A server that sends no chunk for tokens without text times only those with
text; a request with no chunk of tokens at all counts in the rates but not in TTFT/ITL (`no_text`). Every
request has a timeout (`--request-timeout`); the whole run, server start-up included, `--max-seconds`.

`--start-server` runs `python -m nanovllm_jax.serve` on a free loopback port (with `--model`, and any
arguments this script does not know, e.g. `--max-num-seqs 64 --decode-window 8`), waits for /health, and
stops it at the end, also on an error or Ctrl-C; its log goes to a temporary file, kept if the run fails.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

COLUMNS = "conc reqs failed req/s tok/s ttft_p50 ttft_p90 ttft_p99 itl_p50 itl_p90 itl_p99".split()


async def one_request(client, url, model, prompt, args, timeout):
    """Streams one completion: (ttft s or None if no chunk of tokens came, [per-token gaps s], tokens); raises
    on a failure."""
    body = dict(prompt=prompt, max_tokens=args.max_tokens, temperature=0, ignore_eos=True, stream=True)
    body |= dict(model=model, stream_options={"include_usage": True})
    start, times, usage = time.perf_counter(), [], None

    async def stream() -> bool:  # True if the stream ended with [DONE]
        nonlocal usage
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return True
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error']}")
                    if any(c.get("finish_reason") is None for c in event.get("choices", [])):
                        times.append(time.perf_counter())  # a chunk of new tokens (its text may be "")
                    usage = event.get("usage") or usage
        return False

    if not await asyncio.wait_for(stream(), timeout):
        raise RuntimeError("the stream ended without [DONE]")
    tokens = usage["completion_tokens"] if usage else len(times)
    per_gap = max(tokens - 1, 1) / max(len(times) - 1, 1)  # tokens each chunk after the first brought
    return (times[0] - start if times else None), [float(g) / per_gap for g in np.diff(times)], tokens


async def run_level(client, url, model, prompts, concurrency, args, deadline):
    results, errors, pending = [], [], list(reversed(prompts))

    async def worker():
        while pending and time.monotonic() < deadline:
            prompt = pending.pop()
            try:
                timeout = min(args.request_timeout, deadline - time.monotonic())
                results.append(await one_request(client, url, model, prompt, args, timeout))
            except asyncio.TimeoutError:
                errors.append(f"timed out after {timeout:.1f} s")
            except Exception as e:  # every failure is counted, the first one shown
                errors.append(repr(e))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ttft = [r[0] for r in results if r[0] is not None]
    itl = [g for r in results for g in r[1]]

    def pct(xs, q):  # milliseconds
        return round(float(np.percentile(xs, q)) * 1e3, 2) if xs else None

    ok = len(results)
    row = dict(conc=concurrency, reqs=len(prompts), failed=len(errors), not_run=len(pending), no_text=ok - len(ttft))
    row |= {"req/s": round(ok / elapsed, 2), "tok/s": round(sum(r[2] for r in results) / elapsed, 1)}
    row |= {f"ttft_p{q}": pct(ttft, q) for q in (50, 90, 99)} | {f"itl_p{q}": pct(itl, q) for q in (50, 90, 99)}
    return row | dict(elapsed_s=round(elapsed, 2), first_error=errors[0] if errors else None)


async def load_test(url, args, deadline):
    n = max(args.levels) + 1  # a connection per worker (httpx's default pool has 100); no proxies (trust_env)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout, trust_env=False) as client:
        model = (await client.get(url + "/v1/models")).raise_for_status().json()["data"][0]["id"]
        rng = random.Random(args.prompt_seed)
        print(f"model {model!r} at {url}; ms for ttft/itl")
        try:
            timeout = min(args.request_timeout, deadline - time.monotonic())
            await one_request(client, url, model, [1] * args.prompt_len, args, timeout)
        except Exception as e:
            raise RuntimeError(f"the warm-up request failed: {e!r}") from e
        print("  ".join(f"{c:>9}" for c in COLUMNS), flush=True)
        rows = []
        for concurrency in args.levels:
            n = args.num_requests or max(2 * concurrency, 32)
            prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(n)]
            row = await run_level(client, url, model, prompts, concurrency, args, deadline)
            rows.append(row)
            print("  ".join(f"{'-' if row[c] is None else row[c]:>9}" for c in COLUMNS), flush=True)
            notes = [f"first error: {row['first_error']}"] if row["first_error"] else []
            notes += [f"{row['not_run']} not run (--max-seconds)"] if row["not_run"] else []
            notes += [f"{row['no_text']} streamed no chunk of tokens (not in ttft/itl)"] if row["no_text"] else []
            print("".join(f"  {note}\n" for note in notes), end="", flush=True)
            if time.monotonic() >= deadline:
                print(f"stopped: --max-seconds {args.max_seconds} reached", flush=True)
                break
        return rows


def start_server(args, server_args):
    """Starts the server on a free port: (process, url, log file)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "nanovllm_jax.serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += (["--model", args.model] if args.model else []) + ["--log-level", "warning"] + server_args
    log = tempfile.NamedTemporaryFile("w+", prefix="nanovllm-serve-", suffix=".log", delete=False)
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def wait_healthy(proc, url, log_path, deadline):
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while True:
            if proc.poll() is not None or time.monotonic() >= deadline:
                with open(log_path, errors="replace") as f:
                    log_tail = "".join(f.readlines()[-20:])
                why = "was not healthy in --max-seconds" if proc.returncode is None else f"exited ({proc.returncode})"
                raise RuntimeError(f"the server {why}; the end of its log:\n{log_tail}")
            try:
                if client.get(url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Other arguments go to the server.", allow_abbrev=False
    )
    p.add_argument("--host", default="127.0.0.1", help="only 127.0.0.1 is allowed")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--start-server", action="store_true", help="run the server here on a free port")
    p.add_argument("--model", help="with --start-server: the model (default: the tiny random checkpoint)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64, 256], help="concurrency levels")
    p.add_argument("--num-requests", type=int, help="requests per level (default: max(2 * level, 32))")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn from [0, VOCAB)")
    p.add_argument("--prompt-seed", type=int, default=0, help="the prompts' RNG seed")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=600.0, help="bound of the whole run")
    p.add_argument("--json", help="write the rows (and the settings) here")
    args, server_args = p.parse_known_args(argv)
    if args.host != "127.0.0.1":
        p.error(f"--host {args.host!r} refused: this load generator only targets a server on 127.0.0.1")
    if server_args and not args.start_server:
        p.error(f"unrecognized arguments (server arguments need --start-server): {' '.join(server_args)}")
    if min(args.levels) < 1 or args.prompt_len < 1 or args.max_tokens < 1 or (args.num_requests or 1) < 1:
        p.error("--levels, --num-requests, --prompt-len and --max-tokens must be >= 1")

    deadline = time.monotonic() + args.max_seconds
    proc = log = None
    completed = False
    try:
        url = f"http://127.0.0.1:{args.port}"
        if args.start_server:
            proc, url, log = start_server(args, server_args)
            wait_healthy(proc, url, log.name, deadline)
        rows = asyncio.run(load_test(url, args, deadline))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": vars(args) | {"server_args": server_args}, "levels": rows}, f, indent=1)
        completed = True
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except (RuntimeError, TimeoutError, asyncio.TimeoutError, httpx.HTTPError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")
    finally:
        if proc is not None:
            stop_server(proc)
            log.close()
            if completed:
                os.unlink(log.name)
            else:
                print(f"the server's log: {log.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
