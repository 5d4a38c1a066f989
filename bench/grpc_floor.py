"""The floor under a Python relay on the token path (issue 33): what grpc.aio itself costs per streamed message,
with nothing of the mesh in it. Three processes on loopback: a source that streams N messages of the size of a
token's KServe response per call, a relay that passes them on as raw bytes (no parsing, no policy, the same
uvloop as the services), and this client. CPU µs per message of the source and the relay, from /proc.

    python -m bench.grpc_floor [--streams 64] [--messages 64] [--kserve] [--rate 25] [--mesh-server]

Compare with bench/token_relay.py's gateway and router columns: the difference is what the mesh's own Python adds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time

import grpc

from bench.profile_hot_path import cpu_seconds

METHOD = "/floor.Source/Stream"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _handler(behaviour) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("floor.Source", {
        "Stream": grpc.unary_stream_rpc_method_handler(behaviour)})  # no (de)serializers: raw bytes


async def _serve(port: int, behaviour, ready, mesh_server: bool = False) -> None:
    if mesh_server:
        from services.common.server import new_server

        server = new_server()
    else:
        server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(behaviour),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _kserve_response() -> bytes:
    """A token's response as Triton sends it for the generation contract (docs/adding-a-model.md)."""
    import numpy as np
    from tritonclient.grpc import service_pb2

    from services.common.kserve import encode_bytes

    response = service_pb2.ModelInferResponse(model_name="smollm2-trtllm", model_version="1", id="a" * 32)
    for name, datatype, raw, shape in (("text_output", "BYTES", encode_bytes([b" mesh"]), [1]),
                                       ("finish_reason", "BYTES", encode_bytes([b""]), [1]),
                                       ("prompt_tokens", "INT32", np.array([12], "<i4").tobytes(), [1]),
                                       ("completion_tokens", "INT32", np.array([7], "<i4").tobytes(), [1]),
                                       ("token_id", "INT32", np.array([5031], "<i4").tobytes(), [1])):
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return service_pb2.ModelStreamInferResponse(infer_response=response).SerializeToString()


def _run(coroutine) -> None:
    import uvloop

    uvloop.run(coroutine)


def source(port: int, size: int, ready, kserve: bool, rate: float) -> None:
    payload = _kserve_response() if kserve else b"x" * size
    gap_s = 1.0 / rate if rate > 0 else 0.0

    async def stream(request: bytes, context):
        for _ in range(int(request)):
            yield payload
            if gap_s:
                await asyncio.sleep(gap_s)
    _run(_serve(port, stream, ready))


def relay(port: int, upstream: int, ready, mesh_server: bool, kserve: bool) -> None:
    async def main() -> None:
        from tritonclient.grpc import service_pb2

        from services.common.channels import CHANNEL_OPTIONS

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{upstream}", options=CHANNEL_OPTIONS if mesh_server else None)
        parse = service_pb2.ModelStreamInferResponse.FromString if kserve else None
        call = channel.unary_stream(METHOD, response_deserializer=parse)

        async def stream(request: bytes, context):
            async for message in call(request):
                yield message

        async def queued(request: bytes, context):
            # The router's shape: a task reads the upstream stream into a queue, the handler writes from it.
            out: asyncio.Queue = asyncio.Queue()

            async def read() -> None:
                async for message in call(request):
                    out.put_nowait(message)
                out.put_nowait(None)
            reader = asyncio.create_task(read())
            while (message := await out.get()) is not None:
                yield message.SerializeToString()
            await reader
        await _serve(port, queued if kserve else stream, ready, mesh_server)
    _run(main())


async def measure(address: str, streams: int, messages: int, rounds: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(METHOD)

        async def one() -> int:
            return sum([1 async for _ in call(str(messages).encode())])
        await asyncio.gather(*(one() for _ in range(streams)))  # warm
        started = time.perf_counter()
        counts = []
        for _ in range(rounds):
            counts += await asyncio.gather(*(one() for _ in range(streams)))
        return sum(counts), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--messages", type=int, default=64)
    parser.add_argument("--size", type=int, default=220, help="bytes per message (a token's KServe response)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="messages/s per stream from the source (0: as fast as it can), as an engine paces them")
    parser.add_argument("--kserve", action="store_true",
                        help="real KServe token responses, parsed and written again through a queue and a task, "
                             "as the router relays them")
    parser.add_argument("--mesh-server", action="store_true",
                        help="the relay on the services' own server (every interceptor) and channel options")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ports = {"source": _free_port(), "relay": _free_port()}
    events = {name: context.Event() for name in ports}
    processes = {"source": context.Process(target=source, args=(ports["source"], args.size, events["source"],
                                                                args.kserve, args.rate)),
                 "relay": context.Process(target=relay, args=(ports["relay"], ports["source"], events["relay"],
                                                                   args.mesh_server, args.kserve))}
    for process in processes.values():
        process.start()
    try:
        for name, event in events.items():
            if not event.wait(30):
                sys.exit(f"the {name} did not start")
        rows = []
        for path in ("source", "relay"):
            before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
            client_before = time.process_time()
            count, seconds = asyncio.run(measure(f"127.0.0.1:{ports[path]}", args.streams, args.messages,
                                                 args.rounds))
            client_us = (time.process_time() - client_before) * 1e6 / count
            cpu = {name: (cpu_seconds(p.pid) - before[name]) * 1e6 / count for name, p in processes.items()}
            rows.append((path, count / seconds, cpu["source"], cpu["relay"] if path == "relay" else 0.0, client_us))
    finally:
        for process in processes.values():
            process.kill()
    pace = f"{args.rate:.0f}/s per stream" if args.rate else "as fast as the source can"
    print(f"grpc.aio floor: {args.streams} streams of {args.messages} messages "
          f"({'KServe token responses' if args.kserve else f'{args.size} bytes'}), {pace}\n")
    print("| path | messages/s | source CPU µs/message | relay CPU µs/message | client CPU µs/message |")
    print("|---|---:|---:|---:|---:|")
    for path, rate, source_us, relay_us, client_us in rows:
        hops = "client ← relay ← source" if path == "relay" else "client ← source"
        relay_cell = f"{relay_us:.0f}" if path == "relay" else "-"
        print(f"| {hops} | {rate:.0f} | {source_us:.0f} | {relay_cell} | {client_us:.0f} |")

if __name__ == "__main__":
    main()
