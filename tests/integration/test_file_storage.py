"""Where batch files' bytes live (services/gateway/batches/storage.py): the same contract from a local directory
and from an S3-compatible bucket on a real S3 server (moto's, tools/s3.py); a bucket that is missing stops the
gateway at start with the reason, one that does not answer is StorageUnavailable, never a hang or a 500."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.gateway.batches.settings import BatchSettings, S3Settings
from services.gateway.batches.storage import FileStorage, LocalDirectory, S3Bucket, StorageUnavailable, open_storage
from tools.processes import free_port
from tools.s3 import ACCESS_KEY, SECRET_KEY, S3Server

FILE_ID = "file-" + "ab" * 12


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _s3(server: S3Server, bucket: str, **settings) -> S3Settings:
    return S3Settings(bucket=bucket, endpoint_url=server.endpoint, **settings)


@pytest.fixture(params=["directory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FileStorage]:
    if request.param == "directory":
        yield LocalDirectory(tmp_path / "files")
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        yield S3Bucket.open(_s3(server, f"contract-{time.monotonic_ns()}", create_bucket=True))


def test_bytes_go_in_and_come_back_and_a_delete_is_final(storage: FileStorage):
    data = b'{"custom_id": "a"}\n' * 1000 + bytes(range(256))
    storage.put(FILE_ID, data)
    assert storage.get(FILE_ID) == data
    storage.put(FILE_ID, b"replaced")
    assert storage.get(FILE_ID) == b"replaced"
    storage.delete(FILE_ID)
    with pytest.raises(FileNotFoundError):
        storage.get(FILE_ID)
    storage.delete(FILE_ID)  # twice: a retried delete is not an error


@pytest.mark.parametrize("key", ["../../etc/passwd", "file-" + "ab" * 12 + "/../x", "file-XYZ", "", "batch-files/x"])
def test_only_ids_the_mesh_made_reach_a_path_or_key(storage: FileStorage, key: str):
    for attempt in (lambda: storage.put(key, b"x"), lambda: storage.get(key), lambda: storage.delete(key)):
        with pytest.raises(ValueError, match="not a file id the mesh made"):
            attempt()


def test_objects_are_kept_under_the_prefix(s3_server: S3Server):
    bucket = f"prefixed-{time.monotonic_ns()}"
    S3Bucket.open(_s3(s3_server, bucket, create_bucket=True, prefix="tenant-files/")).put(FILE_ID, b"x")
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [entry["Key"] for entry in listed] == [f"tenant-files/{FILE_ID}"]


def test_a_bucket_made_outside_us_east_1_is_made_in_its_region(s3_server: S3Server):
    bucket = f"regional-{time.monotonic_ns()}"
    S3Bucket.open(_s3(s3_server, bucket, create_bucket=True, region="eu-west-1")).put(FILE_ID, b"x")
    assert s3_server.client().get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-west-1"


def test_a_missing_bucket_stops_the_gateway_at_start_with_the_reason(s3_server: S3Server):
    with pytest.raises(RuntimeError, match=r"no such bucket.*MESH_GATEWAY_BATCH__S3__CREATE_BUCKET"):
        open_storage(BatchSettings(storage="s3", s3=_s3(s3_server, "never-made")))


def test_s3_storage_needs_a_bucket_named():
    with pytest.raises(ValueError, match="MESH_GATEWAY_BATCH__S3__BUCKET"):
        BatchSettings(storage="s3")


def test_a_store_that_does_not_answer_is_unavailable_not_a_hang():
    """Nothing listens on the port: the gateway starts (inference does not need the bucket) and each call fails
    in bounded time with StorageUnavailable, which the routes answer 503."""
    bucket = S3Bucket.open(S3Settings(bucket="away", endpoint_url=f"http://127.0.0.1:{free_port()}", timeout_s=1))
    for attempt in (lambda: bucket.put(FILE_ID, b"x"), lambda: bucket.get(FILE_ID), lambda: bucket.delete(FILE_ID)):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="bucket 'away'"):
            attempt()
        assert time.monotonic() - started < 15
