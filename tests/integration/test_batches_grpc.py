"""The Batches gRPC service (protos/inference_mesh/v1/batches.proto) through the real Envoy (TLS) and gateways: a
file streamed up in chunks, a batch run to completed and its output streamed down; the same batch seen through
the HTTP API; another tenant's ids NOT_FOUND; bad streams and batches refused with a precise status, nothing kept."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from inference_mesh.v1 import batches_pb2, batches_pb2_grpc
from tests.conftest import BATCH_ENV, KEYS, LLM
from tools.stack import LocalStack

TENANT = "tenant-batch-grpc"


def _key(tenant: str = TENANT) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


@pytest.fixture(scope="module")
def batches(stack: LocalStack) -> Iterator[batches_pb2_grpc.BatchesStub]:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{stack.ports.edge}", credentials) as channel:
        yield batches_pb2_grpc.BatchesStub(channel)


def _lines(count: int, max_tokens: int = 4) -> bytes:
    return b"".join(json.dumps({"custom_id": f"g{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": LLM, "max_tokens": max_tokens, "temperature": 0,
                                         "messages": [{"role": "user", "content": f"Name a river, number {i}."}]}}
                               ).encode() + b"\n" for i in range(count))


def _upload(batches, data: bytes, chunk: int = 256, tenant: str = TENANT, purpose: str = "batch"):
    def parts() -> Iterator[batches_pb2.UploadFileRequest]:
        yield batches_pb2.UploadFileRequest(header=batches_pb2.FileHeader(filename="rivers.jsonl", purpose=purpose))
        for start in range(0, len(data), chunk):
            yield batches_pb2.UploadFileRequest(chunk=data[start:start + chunk])
    return batches.UploadFile(parts(), metadata=_key(tenant), timeout=30)


def _content(batches, file_id: str, tenant: str = TENANT) -> bytes:
    return b"".join(c.data for c in batches.GetFileContent(batches_pb2.FileRef(file_id=file_id),
                                                           metadata=_key(tenant), timeout=30))


def _final(batches, batch_id: str, timeout_s: float = 240.0) -> batches_pb2.Batch:
    deadline = time.monotonic() + timeout_s
    ended = {batches_pb2.BATCH_STATUS_COMPLETED, batches_pb2.BATCH_STATUS_FAILED, batches_pb2.BATCH_STATUS_EXPIRED,
             batches_pb2.BATCH_STATUS_CANCELLED}
    while (batch := batches.GetBatch(batches_pb2.BatchRef(batch_id=batch_id), metadata=_key(),
                                     timeout=10)).status not in ended:
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    return batch


def _refused(call, code: grpc.StatusCode, words: str = "") -> str:
    with pytest.raises(grpc.RpcError) as refused:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    assert refused.value.code() == code, (refused.value.code(), refused.value.details())
    assert words in refused.value.details(), refused.value.details()
    return refused.value.details()


def test_a_batch_runs_to_completed_over_grpc_and_http_sees_the_same(stack, batches):
    data = _lines(5)
    uploaded = _upload(batches, data)
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(data) and uploaded.purpose == "batch"
    assert _content(batches, uploaded.id) == data, "uploaded in 256-byte chunks, read back whole"
    created = batches.CreateBatch(batches_pb2.CreateBatchRequest(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "grpc"}), metadata=_key(), timeout=30)
    assert created.status == batches_pb2.BATCH_STATUS_VALIDATING and created.request_counts.total == 5
    assert not created.HasField("completed_at") and created.metadata == {"job": "grpc"}
    done = _final(batches, created.id)
    assert done.status == batches_pb2.BATCH_STATUS_COMPLETED, done
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    assert done.HasField("completed_at") and done.completed_at >= done.created_at and not done.error_file_id
    output = [json.loads(line) for line in _content(batches, done.output_file_id).splitlines()]
    assert sorted(line["custom_id"] for line in output) == [f"g{i}" for i in range(5)]
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in output)
    assert done.id in [b.id for b in batches.ListBatches(batches_pb2.ListBatchesRequest(limit=100),
                                                         metadata=_key(), timeout=10).batches]
    listed = batches.ListFiles(batches_pb2.ListFilesRequest(purpose="batch"), metadata=_key(), timeout=10)
    assert uploaded.id in [f.id for f in listed.files]
    # The HTTP API is the same store: its view of the batch is this one.
    trust = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    seen = httpx.get(f"https://localhost:{stack.ports.edge}/v1/batches/{done.id}", verify=trust,
                     headers={"authorization": f"Bearer {KEYS[TENANT]}"}, timeout=30).json()
    assert (seen["status"], seen["output_file_id"], seen["request_counts"]["completed"]) == (
        "completed", done.output_file_id, 5)
    _refused(lambda: batches.CancelBatch(batches_pb2.BatchRef(batch_id=done.id), metadata=_key(), timeout=10),
             grpc.StatusCode.FAILED_PRECONDITION, "only a batch in progress can be cancelled")
    assert batches.DeleteFile(batches_pb2.FileRef(file_id=uploaded.id), metadata=_key(), timeout=10).deleted
    _refused(lambda: batches.GetFile(batches_pb2.FileRef(file_id=uploaded.id), metadata=_key(), timeout=10),
             grpc.StatusCode.NOT_FOUND)


def test_another_tenants_ids_are_not_found_and_no_key_is_unauthenticated(batches):
    own = _upload(batches, _lines(1))
    batch = batches.CreateBatch(batches_pb2.CreateBatchRequest(input_file_id=own.id, endpoint="/v1/chat/completions",
                                                               completion_window="24h"), metadata=_key(), timeout=30)
    other = _key("tenant-batch-other")
    for call in (lambda: batches.GetFile(batches_pb2.FileRef(file_id=own.id), metadata=other, timeout=10),
                 lambda: batches.GetFileContent(batches_pb2.FileRef(file_id=own.id), metadata=other, timeout=10),
                 lambda: batches.DeleteFile(batches_pb2.FileRef(file_id=own.id), metadata=other, timeout=10),
                 lambda: batches.GetBatch(batches_pb2.BatchRef(batch_id=batch.id), metadata=other, timeout=10),
                 lambda: batches.CancelBatch(batches_pb2.BatchRef(batch_id=batch.id), metadata=other, timeout=10),
                 lambda: batches.CreateBatch(batches_pb2.CreateBatchRequest(
                     input_file_id=own.id, endpoint="/v1/chat/completions"), metadata=other, timeout=10)):
        _refused(call, grpc.StatusCode.NOT_FOUND, "No such")
    assert batch.id not in [b.id for b in batches.ListBatches(batches_pb2.ListBatchesRequest(), metadata=other,
                                                              timeout=10).batches]
    _refused(lambda: batches.GetFile(batches_pb2.FileRef(file_id=own.id), timeout=10),
             grpc.StatusCode.UNAUTHENTICATED)
    assert batches.GetFile(batches_pb2.FileRef(file_id=own.id), metadata=_key(), timeout=10).id == own.id
    _final(batches, batch.id)
    batches.DeleteFile(batches_pb2.FileRef(file_id=own.id), metadata=_key(), timeout=10)


def _files(batches) -> list[str]:
    return [f.id for f in batches.ListFiles(batches_pb2.ListFilesRequest(limit=100), metadata=_key(),
                                            timeout=10).files]


@pytest.mark.parametrize("parts, words", [
    ([batches_pb2.UploadFileRequest(chunk=b"{}\n")], "the first UploadFileRequest is the header"),
    ([], "no UploadFileRequest was sent"),
    ([batches_pb2.UploadFileRequest(header=batches_pb2.FileHeader(filename="a", purpose="batch"))] * 2,
     "only the first UploadFileRequest is a header"),
    ([batches_pb2.UploadFileRequest(header=batches_pb2.FileHeader(filename="a", purpose="fine-tune"))],
     "keeps files for batches only"),
    ([batches_pb2.UploadFileRequest(header=batches_pb2.FileHeader(filename="a", purpose="batch"))], "empty"),
    ([batches_pb2.UploadFileRequest(header=batches_pb2.FileHeader(filename="a", purpose="batch")),
      batches_pb2.UploadFileRequest(chunk=b"not json\n")], "line 1 is not JSON"),
    ([batches_pb2.UploadFileRequest(header=batches_pb2.FileHeader(filename="a", purpose="batch")),
      *[batches_pb2.UploadFileRequest(chunk=b" " * (512 * 1024))] * 5], "bytes per file"),
], ids=["no-header", "nothing", "two-headers", "purpose", "empty", "not-jsonl", "over-limit"])
def test_a_bad_upload_stream_is_invalid_and_nothing_is_kept(batches, parts, words):
    assert int(BATCH_ENV["MESH_GATEWAY_BATCH__MAX_FILE_BYTES"]) < 5 * 512 * 1024
    before = _files(batches)
    _refused(lambda: batches.UploadFile(iter(parts), metadata=_key(), timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
             words)
    assert _files(batches) == before


@pytest.mark.parametrize("endpoint, window, code, words", [
    ("/v1/images/generations", "24h", grpc.StatusCode.INVALID_ARGUMENT, "is not one a batch can call"),
    ("/v1/embeddings", "24h", grpc.StatusCode.INVALID_ARGUMENT, "line 1 calls /v1/chat/completions"),
    ("/v1/chat/completions", "30d", grpc.StatusCode.INVALID_ARGUMENT, "not a duration"),
])
def test_a_bad_batch_is_refused_with_a_precise_status_and_nothing_is_created(batches, endpoint, window, code, words):
    file_id = _upload(batches, _lines(1)).id
    try:
        listed = batches_pb2.ListBatchesRequest(limit=100)
        before = [b.id for b in batches.ListBatches(listed, metadata=_key(), timeout=10).batches]
        _refused(lambda: batches.CreateBatch(batches_pb2.CreateBatchRequest(
            input_file_id=file_id, endpoint=endpoint, completion_window=window), metadata=_key(), timeout=30),
            code, words)
        assert [b.id for b in batches.ListBatches(listed, metadata=_key(), timeout=10).batches] == before
    finally:
        batches.DeleteFile(batches_pb2.FileRef(file_id=file_id), metadata=_key(), timeout=10)


def test_grpcurl_lists_batches_through_the_edge_as_the_readme_shows(stack, batches):
    """The README's call: grpcurl finds the service by reflection through Envoy and reads the caller's batches."""
    from tests.integration.test_grpcurl import run

    listed = run("-cacert", str(stack.pki.ca_cert), "-H", f"x-api-key: {KEYS[TENANT]}", "-d", '{"limit": 2}',
                 f"localhost:{stack.ports.edge}", "inference_mesh.v1.Batches/ListBatches")
    assert listed.returncode == 0, listed.stderr
    answer = json.loads(listed.stdout)
    mine = batches.ListBatches(batches_pb2.ListBatchesRequest(limit=2), metadata=_key(), timeout=10)
    assert [b["id"] for b in answer["batches"]] == [b.id for b in mine.batches] and len(mine.batches) == 2
    assert answer["batches"][0]["status"].startswith("BATCH_STATUS_")
