"""OpenAI's Files and Batches API through the real Envoy, gateways, router and Triton, with the official openai SDK:
a batch runs to completed and its output parses; an invalid line lands in the error file while the rest succeed;
a cancel mid-way and a window that runs out end what had not started; a gateway killed mid-batch leaves its lines
to the other, every line answered once; another tenant's ids are not found; bad files and batches are refused
with nothing half-created; file bytes live in an S3 bucket, and a bucket that stops answering is a 503 with
nothing kept. The shared stack's gateways run with tests/conftest.py's BATCH_ENV and keep files on its S3 server."""

from __future__ import annotations

import json
import signal
import ssl
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import BATCH_BUCKET, BATCH_ENV, EMBEDDER, KEYS, LLM
from tools.processes import free_port
from tools.s3 import start_s3_server
from tools.stack import LocalStack

POLL_S = 0.5


def _client(stack: LocalStack, tenant: str) -> openai.OpenAI:
    trust = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    return openai.OpenAI(api_key=KEYS[tenant], base_url=f"https://localhost:{stack.ports.edge}/v1", max_retries=0,
                         http_client=httpx.Client(verify=trust, timeout=60))


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with _client(stack, "tenant-batch") as made:
        yield made


def _chat_line(custom_id: str, content: str, max_tokens: int = 4, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": LLM, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0, **extra}}


def _jsonl(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def _upload(client: openai.OpenAI, lines: list[dict]) -> str:
    return client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch").id


def _until(client: openai.OpenAI, batch_id: str, done, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} ({batch.request_counts})"
        time.sleep(POLL_S)


def _final(client: openai.OpenAI, batch_id: str, timeout_s: float = 240.0):
    return _until(client, batch_id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"), timeout_s)


def _lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_a_chat_batch_completes_and_an_invalid_line_goes_to_the_error_file(client):
    lines = [_chat_line(f"q{i}", f"Name a fruit, number {i}.") for i in range(6)]
    lines.insert(3, _chat_line("bad", "This one asks for no tokens.", max_tokens=-3))
    file_id = _upload(client, lines)
    created = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "nightly"})
    assert created.status == "validating" and created.request_counts.total == 7
    assert created.metadata == {"job": "nightly"} and created.input_file_id == file_id
    done = _final(client, created.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = _lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == [f"q{i}" for i in range(6)]
    for line in output:
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None and response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"], line
        assert line["id"].startswith("batch_req_")
    (error,) = _lines_of(client, done.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    assert "max_tokens" in error["response"]["body"]["error"]["message"], error
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert done.id in [b.id for b in client.batches.list(limit=100).data]


def test_an_embeddings_batch_answers_what_the_api_answers(client):
    texts = [f"batch embedding {i}" for i in range(12)]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBEDDER, "input": text}} for i, text in enumerate(texts)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/embeddings",
                                  completion_window="24h")
    done = _final(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 12 and done.error_file_id is None
    by_id = {line["custom_id"]: line["response"]["body"] for line in _lines_of(client, done.output_file_id)}
    direct = client.embeddings.create(model=EMBEDDER, input=texts[5]).data[0].embedding
    assert by_id["e5"]["data"][0]["embedding"] == pytest.approx(direct, abs=1e-5)


def test_a_cancel_mid_way_ends_what_had_not_started(client):
    lines = [_chat_line(f"c{i}", f"Count from one to twenty, request {i}.", max_tokens=16) for i in range(16)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    _until(client, batch.id, lambda b: b.request_counts.completed >= 2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = _final(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    output = _lines_of(client, done.output_file_id)
    errors = _lines_of(client, done.error_file_id)
    assert len(output) == done.request_counts.completed >= 2
    assert errors and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"c{i}" for i in range(16)), \
        "every line answered once: run, or cancelled before it started"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_a_batch_past_its_window_expires_what_had_not_run(stack):
    with _client(stack, "tenant-batch-limits") as client:
        lines = [_chat_line(f"x{i}", f"Write a long story, number {i}.", max_tokens=32) for i in range(24)]
        batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                      completion_window="2s")
        done = _final(client, batch.id)
        assert done.status == "expired" and done.expired_at, done
        errors = _lines_of(client, done.error_file_id)
        expired = [e for e in errors if e["error"] and e["error"]["code"] == "batch_expired"]
        assert expired and done.request_counts.failed == len(errors)
        assert len(_lines_of(client, done.output_file_id)) + len(errors) == 24


def test_a_gateway_killed_mid_batch_leaves_its_lines_to_the_other(stack, client):
    lines = [_chat_line(f"k{i}", f"Say a colour, request {i}.", max_tokens=8) for i in range(24)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    _until(client, batch.id, lambda b: b.request_counts.completed >= 4)
    victim = stack.processes["gateway-1"]
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(10)
    try:
        done = _final(client, batch.id)
    finally:
        stack.start_gateway(1)
    assert done.status == "completed" and done.request_counts.completed == 24, done
    output = _lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"k{i}" for i in range(24)), \
        "every line exactly once in the output"
    assert done.error_file_id is None


def test_another_tenants_files_and_batches_are_not_found(stack, client):
    file_id = _upload(client, [_chat_line("own", "hi")])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with _client(stack, "tenant-batch-other") as other:
        for attempt in (lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
                        lambda: other.files.delete(file_id), lambda: other.batches.retrieve(batch.id),
                        lambda: other.batches.cancel(batch.id),
                        lambda: other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                     completion_window="24h")):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert file_id not in [f.id for f in other.files.list().data]
        assert batch.id not in [b.id for b in other.batches.list().data]
    assert client.files.retrieve(file_id).id == file_id, "the owner's file is untouched"
    _final(client, batch.id)


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "the file is empty"),
    (b"custom_id,method,url\nq1,POST,/v1/chat/completions\n", 400, "line 1 is not JSON"),
    (_jsonl([_chat_line("a", "x" * (1024 * 1024 + 10))]), 400, "over this deployment's 1048576 per line"),
    (b"x" * (int(BATCH_ENV["MESH_GATEWAY_BATCH__MAX_FILE_BYTES"]) + 1), 413, "bytes per file"),
])
def test_a_bad_file_is_refused_and_nothing_is_kept(stack, data, status, words):
    with _client(stack, "tenant-batch-other") as client:
        before = [f.id for f in client.files.list().data]
        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=("bad.jsonl", data), purpose="batch")
        assert refused.value.status_code == status and words in refused.value.message, refused.value.message
        assert [f.id for f in client.files.list().data] == before


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"purpose=batch"),  # no boundary
    ("multipart/form-data; boundary=b0", b'--b0\r\nContent-Disposition: form-data; name="file"\r\n\r\n{}'),
    ("multipart/form-data; boundary=b0", b"no starting boundary"),
    ("multipart/form-data; boundary=b0", b"--b0\r\nnot a header line\r\n\r\nx\r\n--b0--\r\n"),
])
def test_a_malformed_form_is_a_400_in_openai_shape(stack, content_type, body):
    """Bodies no SDK sends, as an attacker or a hand-written client would: the multipart reader's own errors are
    the caller's mistake (400), never a 500, and nothing is kept."""
    with _client(stack, "tenant-batch-other") as client:
        before = [f.id for f in client.files.list().data]
        answer = client._client.post(f"{client.base_url}files", content=body, headers={
            "authorization": f"Bearer {KEYS['tenant-batch-other']}", "content-type": content_type})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and "multipart/form-data body cannot be read" in \
            error["message"], error
        assert [f.id for f in client.files.list().data] == before


@pytest.mark.parametrize("endpoint, lines, window, status, words", [
    ("/v1/images/generations", [_chat_line("a", "hi")], "24h", 400, "is not one a batch can call"),
    ("/v1/embeddings", [_chat_line("a", "hi")], "24h", 400, "line 1 calls /v1/chat/completions"),
    ("/v1/chat/completions", [_chat_line("a", "hi"), {**_chat_line("b", "hi"), "body": {"model": "gpt-nope",
                                                                                      "messages": []}}],
     "24h", 404, "line 2: "),
    # An embedding model named in a chat batch: the catalog's answer for a model of another kind.
    ("/v1/chat/completions", [{**_chat_line("a", "hi"), "body": {"model": EMBEDDER, "messages": []}}], "24h", 404,
     "line 1: unknown model"),
    ("/v1/chat/completions", [_chat_line("a", "hi")], "2 days", 400, "not a duration"),
    ("/v1/chat/completions", [_chat_line("a", "hi")], "30d", 400, "not a duration"),
])
def test_a_bad_batch_is_refused_and_nothing_is_created(stack, endpoint, lines, window, status, words):
    with _client(stack, "tenant-batch-other") as client:
        file_id = _upload(client, lines)
        try:
            before = [b.id for b in client.batches.list(limit=100).data]
            with pytest.raises(openai.APIStatusError) as refused:
                client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window=window)
            assert refused.value.status_code == status and words in refused.value.message, refused.value.message
            assert [b.id for b in client.batches.list(limit=100).data] == before
        finally:
            client.files.delete(file_id)


def test_a_tenant_over_its_file_limit_is_refused(stack):
    limit = int(BATCH_ENV["MESH_GATEWAY_BATCH__MAX_FILES"])
    with _client(stack, "tenant-batch-other") as client:
        made = [_upload(client, [_chat_line("a", "hi")]) for _ in range(limit - len(client.files.list().data))]
        try:
            with pytest.raises(openai.RateLimitError) as refused:
                _upload(client, [_chat_line("a", "hi")])
            assert f"holds {limit} files" in refused.value.message
            assert len(client.files.list(limit=100).data) == limit
        finally:
            for file_id in made:
                assert client.files.delete(file_id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(made[0])


def test_file_bytes_live_in_the_bucket_and_go_with_a_delete(stack, client, s3_server):
    """The shared stack's gateways keep batch files in an S3 bucket (tests/conftest.py): an upload's bytes and a
    batch's output are objects there, nothing is written to a local directory, and a delete removes the object."""
    bucket = s3_server.client()
    data = _jsonl([_chat_line("s3", "Name a bird.")])
    file_id = client.files.create(file=("birds.jsonl", data), purpose="batch").id
    assert bucket.get_object(Bucket=BATCH_BUCKET, Key=f"batch-files/{file_id}")["Body"].read() == data
    done = _final(client, client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
    stored = bucket.get_object(Bucket=BATCH_BUCKET, Key=f"batch-files/{done.output_file_id}")["Body"].read()
    assert stored == client.files.content(done.output_file_id).content and b'"custom_id":"s3"' in stored
    assert not (stack.run_dir / "files").exists(), "with S3 storage no gateway writes a files directory"
    assert client.files.delete(file_id).deleted
    with pytest.raises(bucket.exceptions.ClientError) as gone:
        bucket.head_object(Bucket=BATCH_BUCKET, Key=f"batch-files/{file_id}")
    assert gone.value.response["Error"]["Code"] == "404"


def test_a_bucket_that_stops_answering_is_a_503_and_nothing_is_kept(stack, tmp_path):
    """A gateway whose S3 server went away: an upload is a 503 in OpenAI's shape that says to try again, and keeps
    no file row; an earlier file's content is a 503, not a 404 or a 500; inference on the same gateway goes on."""
    server = start_s3_server(tmp_path / "s3.log")
    port, metrics, http = free_port(), free_port(), free_port()
    stack.start_gateway_as("gateway-s3-away", {**stack.gateway_env(port, metrics, http), **BATCH_ENV,
                                               **server.gateway_env("mesh-away"),
                                               "MESH_GATEWAY_BATCH__S3__TIMEOUT_S": "2"})
    try:
        with openai.OpenAI(api_key=KEYS["tenant-batch-other"], base_url=f"http://127.0.0.1:{http}/v1",
                           max_retries=0, timeout=60) as direct:
            kept = _upload(direct, [_chat_line("a", "hi")])
            before = [f.id for f in direct.files.list(limit=100).data]
            server.stop()
            with pytest.raises(openai.APIStatusError) as refused:
                _upload(direct, [_chat_line("b", "hi")])
            assert refused.value.status_code == 503 and "try again" in refused.value.message, refused.value.message
            assert [f.id for f in direct.files.list(limit=100).data] == before, "no row for bytes never kept"
            with pytest.raises(openai.APIStatusError) as away:
                direct.files.content(kept)
            assert away.value.status_code == 503, away.value
            assert len(direct.embeddings.create(model=EMBEDDER, input="still serving").data[0].embedding) == 384
            assert direct.files.delete(kept).deleted, "the row goes even when the bytes cannot"
    finally:
        stack.processes.pop("gateway-s3-away").stop()
        server.stop()


def test_a_tiers_batch_terms_set_its_limits_and_its_price(stack):
    """Tier `batch-terms` (tests/conftest.py): 2 files, 1 batch in flight (tighter than the deployment's 6 and
    3), half price at batch priority. The refusals name the tier's limit; the batch line's usage record costs half
    per token what the same tenant's interactive request costs, on the same priced pool."""
    from sqlalchemy import select

    from services.admin import schema
    from services.admin.store import AdminStore

    tenant = "tenant-batch-terms"
    with _client(stack, tenant) as client:
        first = _upload(client, [_chat_line("terms", "Name a planet.", max_tokens=8)])
        second = _upload(client, [_chat_line("terms", "Name a moon.", max_tokens=8)])
        with pytest.raises(openai.RateLimitError) as refused:
            _upload(client, [_chat_line("terms", "Name a star.")])
        assert "holds 2 files, the most its tier may keep" in refused.value.message
        batch = client.batches.create(input_file_id=first, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.RateLimitError) as busy:
            client.batches.create(input_file_id=second, endpoint="/v1/chat/completions", completion_window="24h")
        assert "1 batches in flight, the most its tier may run" in busy.value.message
        assert _final(client, batch.id).request_counts.completed == 1
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Name a comet."}],
                                       max_tokens=8, temperature=0)
    store = AdminStore.open(stack.admin_database_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            with store.engine.connect() as connection:
                rows = connection.execute(select(schema.usage).where(schema.usage.c.tenant == tenant)).all()
            if len(rows) >= 2:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.5)
    finally:
        store.close()
    per_token = sorted(row.cost_usd / (row.input_tokens + row.output_tokens) for row in rows)
    assert per_token[1] > 0 and per_token[0] == pytest.approx(per_token[1] * 0.5), rows
