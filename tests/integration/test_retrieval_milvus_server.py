"""The retrieval tests again, against a real Milvus standalone (milvus-server) instead of milvus-lite.

Select or skip them with the marker: `pytest -m milvus_server` / `pytest -m "not milvus_server"`.
"""

from __future__ import annotations

import time

import grpc
import pytest

from inference_mesh.v1 import mesh_pb2_grpc
from tests.integration.test_retrieval import *  # noqa: F403  (the same tests, collected again with the fixtures below)
from tests.integration.test_retrieval import ask, search
from tools.stack import LocalStack, StackPorts

pytestmark = pytest.mark.milvus_server


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tenants_file):
    mesh = LocalStack(tmp_path_factory.mktemp("milvus-server"), StackPorts.free(1, gateways=1),
                      tenants_file=tenants_file, with_edge=False, with_cache=False, milvus_backend="server")
    mesh.start()
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.gateway_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def mesh(channel):
    return mesh_pb2_grpc.InferenceMeshStub(channel)


def test_milvus_down_search_fails_fast_and_ask_degrades(mesh, stack, corpus):
    """Stopping the standalone: Search fails fast, Ask degrades. Its restart (embedded etcd, coordinators
    re-registering) takes minutes, so recovery is tested on milvus-lite only; this test runs last here."""
    stack.processes["milvus"].kill()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        search(mesh, "bread")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 3.0
    chunks = ask(mesh, "Why does sourdough bread rise?")
    assert "retrieval" in chunks[-1].metadata.degraded and not chunks[-1].metadata.citations
    assert "".join(c.text for c in chunks).strip()
