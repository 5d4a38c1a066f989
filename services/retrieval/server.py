"""Retrieval process: the Retrieval service on grpc.aio over Milvus, embeddings through the router."""

from __future__ import annotations

import asyncio

from prometheus_client import start_http_server
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.resilient_channel import resilient_channel
from services.common.server import ServiceHost, run_service
from services.retrieval.chunking import Chunker
from services.retrieval.index import DocumentIndex
from services.retrieval.service import RetrievalService
from services.retrieval.settings import RetrievalSettings


async def serve(settings: RetrievalSettings) -> None:
    index = DocumentIndex(settings.milvus_uri, settings.collection, settings.dimension, settings.hnsw_m,
                          settings.hnsw_ef_construction, settings.milvus_timeout_s, settings.consistency_level)
    chunker = Chunker(settings.tokenizer_file, settings.chunk_tokens, settings.chunk_overlap_tokens)
    router_channel = resilient_channel(settings.router_address, "router", settings.resilience, settings.tls)
    host = ServiceHost("retrieval", settings.address, settings.shutdown_grace_s, settings.drain_delay_s,
                       tls=settings.tls)
    retrieval_pb2_grpc.add_RetrievalServicer_to_server(
        RetrievalService(settings, index, chunker, service_pb2_grpc.GRPCInferenceServiceStub(router_channel)),
        host.server)
    host.expose([retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name])
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)

    async def keep_index() -> None:
        # SERVING while Milvus answers; reconnects (with a new client) after an outage.
        while True:
            if not index.ready:
                await index.connect()
            await host.set_serving(index.ready)
            await asyncio.sleep(1.0)

    try:
        await host.run(background=[keep_index])
    finally:
        await index.close()
        await router_channel.close()


def main() -> None:
    run_service("retrieval", RetrievalSettings, serve)
