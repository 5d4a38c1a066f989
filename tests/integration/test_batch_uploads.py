"""An upload the mesh refuses after its bytes were stored (services/gateway/batches/api.py) on SQLite and a real
PostgreSQL: the caller is told why it was refused even when the storage then fails to delete those bytes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.admin.store import AdminStore
from services.gateway.auth import Caller
from services.gateway.batches.api import BatchApi, BatchError
from services.gateway.batches.settings import BatchSettings
from services.gateway.batches.storage import LocalDirectory, StorageUnavailable
from services.gateway.batches.store import BatchStore

LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}\n'


class DeletesFail(LocalDirectory):
    """A directory that keeps bytes but stops answering before they can be deleted: a bucket gone away mid-upload."""

    def delete(self, file_id: str) -> None:
        raise StorageUnavailable("the bucket did not answer")


def test_a_refused_upload_stays_refused_when_its_bytes_cannot_be_deleted(url, tmp_path):
    storage = DeletesFail(tmp_path / "files")
    api = BatchApi(BatchStore(AdminStore.open(url).engine), storage, BatchSettings(), core=None)
    caller = Caller("acme", "standard", max_batch_files=1)

    async def scenario() -> None:
        await api.upload(caller, "batch", "first.jsonl", LINE)
        with pytest.raises(BatchError) as refused:
            await api.upload(caller, "batch", "second.jsonl", LINE)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert "the most its tier may keep" in str(refused.value), refused.value
        files, more = await api.files(caller, None, 10, None)
        assert [f["filename"] for f in files] == ["first.jsonl"] and not more

    asyncio.run(scenario())
    stored = [path for path in (tmp_path / "files").rglob("*") if path.is_file()]
    assert len(stored) == 2, f"the refused upload's bytes stay behind, unreachable: {stored}"
