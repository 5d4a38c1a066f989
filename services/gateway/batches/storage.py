"""Where a file's bytes live: a local directory (one machine, or a volume every replica mounts) or an S3-compatible
bucket (what replicas on many machines share). Keys are the file ids the mesh made: no caller-chosen name reaches a
path or an object key."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.gateway.batches.settings import BatchSettings, S3Settings

log = logging.getLogger(__name__)

_ID = re.compile(r"^file-[0-9a-f]{24,32}$")


def _checked(file_id: str) -> str:
    if not _ID.match(file_id):
        raise ValueError(f"not a file id the mesh made: {file_id[:60]!r}")
    return file_id


class StorageUnavailable(Exception):
    """The store did not answer (unreachable, timed out, refused the mesh's credentials): try again later."""


class FileStorage(Protocol):
    """`get` raises FileNotFoundError for a key that is not there, StorageUnavailable when it cannot tell."""

    def put(self, file_id: str, data: bytes) -> None: ...
    def get(self, file_id: str) -> bytes: ...
    def delete(self, file_id: str) -> None: ...


class LocalDirectory:
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, file_id: str, data: bytes) -> None:
        # Written beside and renamed: a reader never sees half a file, a crash leaves no partial one.
        target = self._root / _checked(file_id)
        handle, temporary = tempfile.mkstemp(dir=self._root, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, file_id: str) -> bytes:
        return (self._root / _checked(file_id)).read_bytes()

    def delete(self, file_id: str) -> None:
        (self._root / _checked(file_id)).unlink(missing_ok=True)


class S3Bucket:
    def __init__(self, client: Any, settings: S3Settings) -> None:
        self._client = client
        self._bucket = settings.bucket
        self._prefix = settings.prefix
        self._region = settings.region
        self._where = f"{settings.endpoint_url or 'AWS S3'} bucket {settings.bucket!r}"

    @classmethod
    def open(cls, settings: S3Settings) -> S3Bucket:
        """A client for the bucket, checked once: a bucket that does not exist, or that these credentials may not
        use, stops the gateway at start with the reason. One that cannot be reached now is only logged: the
        gateway serves inference without it, and the batch routes answer 503 until it is back."""
        client = boto3.client(
            "s3", endpoint_url=settings.endpoint_url or None, region_name=settings.region,
            config=Config(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
                          retries={"max_attempts": 3, "mode": "standard"},
                          # Path-style: MinIO and most compatible stores serve no virtual-host buckets.
                          s3={"addressing_style": "path"}))
        bucket = cls(client, settings)
        bucket._check(settings.create_bucket)
        return bucket

    def _check(self, create: bool) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 and create:
                # Outside us-east-1, S3 makes a bucket only where the request names the region.
                where = {} if self._region == "us-east-1" else {
                    "CreateBucketConfiguration": {"LocationConstraint": self._region}}
                self._client.create_bucket(Bucket=self._bucket, **where)
                log.info("made the batch files bucket", extra={"bucket": self._bucket})
                return
            if status in (403, 404):
                raise RuntimeError(
                    f"{self._where}: {'no such bucket' if status == 404 else 'access denied'}. Make the bucket and "
                    "give these credentials s3:ListBucket and s3:GetObject/PutObject/DeleteObject on it, or set "
                    "MESH_GATEWAY_BATCH__S3__CREATE_BUCKET=true for a MinIO the mesh may make it in") from None
            log.warning("batch file storage did not answer", extra={"where": self._where, "error": str(exc)[:300]})
        except BotoCoreError as exc:
            log.warning("batch file storage did not answer", extra={"where": self._where, "error": str(exc)[:300]})

    def _key(self, file_id: str) -> str:
        return self._prefix + _checked(file_id)

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            answer = getattr(self._client, operation)(Bucket=self._bucket, **kwargs)
            if "Body" in answer:  # read here, where a dropped connection mid-body is caught with the rest
                with answer["Body"] as body:
                    return body.read()
            return answer
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(kwargs.get("Key")) from None
            raise StorageUnavailable(f"{self._where}: {str(exc)[:300]}") from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{self._where}: {str(exc)[:300]}") from None

    def put(self, file_id: str, data: bytes) -> None:
        self._call("put_object", Key=self._key(file_id), Body=data)

    def get(self, file_id: str) -> bytes:
        return self._call("get_object", Key=self._key(file_id))

    def delete(self, file_id: str) -> None:
        self._call("delete_object", Key=self._key(file_id))


def open_storage(settings: BatchSettings) -> FileStorage:
    if settings.storage == "s3":
        return S3Bucket.open(settings.s3)
    return LocalDirectory(Path(settings.files_dir))
