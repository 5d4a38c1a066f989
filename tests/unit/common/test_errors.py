"""The one error model (services/common/errors.py): stream errors' writer and reader agree, and a MeshError raised
anywhere in a handler reaches the caller as its status, with its message and trailing metadata."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.errors import MeshError, from_stream_error, stream_error_text
from services.common.server import new_server

CODES = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED]


@pytest.mark.parametrize("code", CODES)
def test_a_stream_error_reads_back_as_written(code):
    read = from_stream_error(stream_error_text(code, "replica r1: no response: 15 s"))
    assert (read.code, read.message) == (code, "replica r1: no response: 15 s")


def test_a_model_error_without_a_known_code_is_the_models_failure():
    assert from_stream_error("INVALID_ARGUMENT: prompt is 3000 tokens").code == grpc.StatusCode.INVALID_ARGUMENT
    unknown = from_stream_error("CUDA out of memory: 2 GiB")
    assert unknown.code == grpc.StatusCode.INTERNAL and "CUDA out of memory" in unknown.message


def _refuse(request: bytes, context) -> bytes:
    raise MeshError(grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant t over its budget", (("retry-after", "3"),))


async def _refuse_async(request: bytes, context) -> bytes:
    await asyncio.sleep(0)
    raise MeshError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be within 1..1024")


async def _stream_then_refuse(request: bytes, context):
    yield b"first"
    raise MeshError(grpc.StatusCode.UNAVAILABLE, "router: the stream ended before the last token")


@contextlib.asynccontextmanager
async def serving(handlers: dict) -> AsyncIterator[grpc.aio.Channel]:
    """The mesh's own server (new_server: every interceptor) with these handlers, and a channel to it."""
    server = new_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Errors", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_every_handler_answers_a_mesh_error_with_its_status():
    async with serving({"Async": grpc.unary_unary_rpc_method_handler(_refuse_async),
                        "Stream": grpc.unary_stream_rpc_method_handler(_stream_then_refuse)}) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary("/test.Errors/Async")(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "max_tokens must be within 1..1024"
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async for item in channel.unary_stream("/test.Errors/Stream")(b"", timeout=5):
                received.append(item)
        assert received == [b"first"] and cut.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_trailing_metadata_reaches_the_caller():
    async def refuse(request: bytes, context) -> bytes:
        return _refuse(request, context)

    async with serving({"Budget": grpc.unary_unary_rpc_method_handler(refuse)}) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary("/test.Errors/Budget")(b"", timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "3") in tuple(refused.value.trailing_metadata())


async def test_a_bug_answers_internal_with_the_request_id_never_its_own_text(caplog):
    """grpc sends an unexpected exception's text ("Unexpected <class 'KeyError'>: ...") to the caller: it can name
    hosts, collections or code. The mesh answers INTERNAL with the request id, and logs the text under that id."""
    async def crash(request: bytes, context) -> bytes:
        raise KeyError("milvus://10.0.3.7:19530/collection mesh_chunks_v7")

    async def crash_streaming(request: bytes, context):
        yield b"first"
        raise RuntimeError("redis://:hunter2@10.0.3.9:6379 refused")

    async with serving({"Crash": grpc.unary_unary_rpc_method_handler(crash),
                        "CrashStream": grpc.unary_stream_rpc_method_handler(crash_streaming)}) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as crashed:
            await channel.unary_unary("/test.Errors/Crash")(b"", timeout=5,
                                                            metadata=(("x-request-id", "req-42"),))
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async for _ in channel.unary_stream("/test.Errors/CrashStream")(b"", timeout=5):
                pass
    assert crashed.value.code() == cut.value.code() == grpc.StatusCode.INTERNAL
    assert "request id req-42" in crashed.value.details() and "10.0.3" not in crashed.value.details()
    assert "10.0.3" not in cut.value.details() and "hunter2" not in cut.value.details()
    logged = [r for r in caplog.records if getattr(r, "request_id", "") == "req-42" and hasattr(r, "detail")]
    assert logged and "mesh_chunks_v7" in logged[0].detail


def test_a_hops_own_failure_is_not_relayed_to_the_caller():
    from services.gateway.errors import from_rpc_error

    class Failed(grpc.aio.AioRpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    internal = from_rpc_error(Failed(grpc.StatusCode.UNKNOWN, "Unexpected <class 'KeyError'>: 'pk'"), "retrieval")
    assert internal.code == grpc.StatusCode.UNKNOWN and "KeyError" not in internal.message
    assert internal.message.startswith("retrieval failed; request id")
    # What a hop wrote for callers still reaches them.
    refused = from_rpc_error(Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "every replica at its bound"), "router")
    assert refused.message == "router: every replica at its bound"


def test_helpers_carry_the_status_and_a_whole_second_retry_hint():
    from services.common import errors

    assert errors.exhausted("spent", 0.2).trailing == (("retry-after", "1"),), "never 0: that invites a storm"
    assert errors.exhausted("spent", 61.5).trailing == (("retry-after", "62"),)
    assert errors.exhausted("spent").trailing == ()
    assert errors.unavailable("down", 3).trailing == (("retry-after", "3"),)
    for make, code in ((errors.invalid, grpc.StatusCode.INVALID_ARGUMENT),
                       (errors.not_found, grpc.StatusCode.NOT_FOUND),
                       (errors.denied, grpc.StatusCode.PERMISSION_DENIED),
                       (errors.unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
                       (errors.too_late, grpc.StatusCode.DEADLINE_EXCEEDED),
                       (errors.unimplemented, grpc.StatusCode.UNIMPLEMENTED), (errors.bug, grpc.StatusCode.INTERNAL)):
        error = make("why")
        assert (error.code, error.message) == (code, "why")


def test_only_the_error_module_builds_statuses_and_aborts():
    """A status is made by a helper and answered by the interceptor (or errors.abort): a raw context.abort or a
    hand-built MeshError elsewhere is how retry hints and messages drift apart."""
    import re
    from pathlib import Path

    services = Path(__file__).resolve().parents[3] / "services"
    raw = re.compile(r"context\.abort\(|MeshError\(\s*grpc\.StatusCode")
    offenders = [f"{path.relative_to(services)}:{number}" for path in services.rglob("*.py")
                 if path.name != "errors.py" or path.parent.name != "common"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if raw.search(line)]
    assert offenders == []
