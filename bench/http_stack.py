"""Which HTTP server the gateway's OpenAI API runs on, chosen by measurement: each candidate serves the same
two answers from one process, on one event loop, as a gateway would (a chat completion's JSON body, and the same
completion as 32 server-sent events), and one client drives all of them in alternating rounds.

Candidates: aiohttp's server (C parser, on the loop grpc.aio already runs), and uvicorn with httptools running a
bare ASGI app (no framework: the least an ASGI server costs; Starlette or FastAPI add to it). Prints a table and
rewrites its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request

import aiohttp

from bench.inference_path import ROOT, Sample, pct, run_load, write_section
from tools.processes import free_port

_CHAT = {"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "smollm2-135m-instruct",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 32, "refusal": None},
                      "logprobs": None, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 30, "completion_tokens": 32, "total_tokens": 62},
         "mesh": {"request_id": "0" * 32, "cache_status": "CACHE_STATUS_EXACT_HIT", "pool": "cpu"}}
_EVENT = {"id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 0, "model": "smollm2-135m-instruct",
          "choices": [{"index": 0, "delta": {"content": "word "}, "logprobs": None, "finish_reason": None}]}
STACKS = ("aiohttp", "uvicorn")


def _body(stream: bool) -> list[bytes]:
    if not stream:
        return [json.dumps(_CHAT).encode()]
    return [b"data: " + json.dumps(_EVENT).encode() + b"\n\n" for _ in range(32)] + [b"data: [DONE]\n\n"]


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        stream = json.loads(await request.read()).get("stream", False)
        if not stream:
            return web.Response(body=_body(False)[0], content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in _body(True):
            await response.write(event)
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True)


def serve_uvicorn(port: int) -> None:
    import uvicorn

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream = json.loads(raw).get("stream", False)
        kind = b"text/event-stream" if stream else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        parts = _body(stream)
        for index, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": index < len(parts) - 1})

    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="asyncio", log_level="warning",
                access_log=False, lifespan="off")


def _wait(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"no server on :{port}")


async def measure(ports: dict[str, int], concurrencies: list[int], requests: int, rounds: int) -> list[dict]:
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(concurrencies))) as session:
        def call(port: int, stream: bool):
            body = {"model": "m", "messages": [{"role": "user", "content": "Write a short paragraph."}],
                    "max_tokens": 32, "stream": stream}

            async def one() -> Sample:
                t0 = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                    await response.read()
                return Sample(time.perf_counter() - t0)
            return one

        for stream in (False, True):
            for port in ports.values():
                await run_load(call(port, stream), 8, 200)
            for c in concurrencies:
                samples: dict[str, list[float]] = {name: [] for name in ports}
                elapsed = dict.fromkeys(ports, 0.0)
                for _ in range(rounds):
                    for name, port in ports.items():
                        got, seconds = await run_load(call(port, stream), c, requests // rounds)
                        samples[name] += [s.latency_s * 1000 for s in got]
                        elapsed[name] += seconds
                rows.append({"stream": stream, "concurrency": c, **{
                    name: {"p50": pct(samples[name], 50), "p99": pct(samples[name], 99),
                           "rps": len(samples[name]) / elapsed[name]} for name in ports}})
    return rows


def render(rows: list[dict]) -> str:
    lines = ["Command: `make bench` (bench/http_stack.py)  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; each server one process on loopback, one "
             "aiohttp client (HTTP/1.1 keep-alive) driving both in alternating rounds.", "",
             "| answer | concurrency | aiohttp p50 ms | uvicorn p50 ms | aiohttp p99 ms | uvicorn p99 ms "
             "| aiohttp req/s | uvicorn req/s | aiohttp/uvicorn req/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        a, u = row["aiohttp"], row["uvicorn"]
        answer = "32 SSE events" if row["stream"] else "one JSON body"
        lines.append(f"| {answer} | {row['concurrency']} | {a['p50']:.2f} | {u['p50']:.2f} | {a['p99']:.2f} "
                     f"| {u['p99']:.2f} | {a['rps']:.0f} | {u['rps']:.0f} | {a['rps'] / u['rps']:.2f} |")
    ratios = [row["aiohttp"]["rps"] / row["uvicorn"]["rps"] for row in rows]
    gaps = [row["aiohttp"]["p50"] - row["uvicorn"]["p50"] for row in rows if row["concurrency"] == 1]
    lines += ["", f"aiohttp/uvicorn req/s: {min(ratios):.2f} to {max(ratios):.2f} over these rows; aiohttp - uvicorn "
              f"p50 at concurrency 1: {', '.join(f'{g:+.2f} ms' for g in gaps)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("serve", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.serve:
        stack, port = args.serve
        {"aiohttp": serve_aiohttp, "uvicorn": serve_uvicorn}[stack](int(port))
        return
    ports = {name: free_port() for name in STACKS}
    servers = [subprocess.Popen([sys.executable, "-m", "bench.http_stack", name, str(port)], cwd=ROOT)
               for name, port in ports.items()]
    try:
        for port in ports.values():
            _wait(port)
        rows = asyncio.run(measure(ports, args.concurrency, args.requests, args.rounds))
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)
    markdown = render(rows)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "http-stack", "The OpenAI API's HTTP server, chosen by measurement")


if __name__ == "__main__":
    main()
