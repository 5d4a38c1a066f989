"""Retrieval process: the Retrieval service on grpc.aio over Milvus, embeddings through the router."""

from __future__ import annotations

from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import retrieval_pb2, retrieval_pb2_grpc, router_pb2_grpc
from services.common.model_catalog import ModelCatalog
from services.common.resilient_channel import resilient_channel
from services.common.server import ServiceHost, run_service
from services.retrieval.chunking import Chunker
from services.retrieval.index import DocumentIndex
from services.retrieval.service import RetrievalService
from services.retrieval.settings import RetrievalSettings


async def serve(settings: RetrievalSettings) -> None:
    router_channel = resilient_channel(settings.router_address, "router", settings.resilience, settings.tls)
    catalog = ModelCatalog(router_pb2_grpc.RouterAdminStub(router_channel), settings.model_refresh_s,
                           settings.milvus_timeouts.search_s)
    index = DocumentIndex(settings.milvus_uri, settings.collection,
                          lambda: catalog.embed_dimension(settings.embedder_model), settings.hnsw,
                          settings.milvus_timeouts, settings.consistency_level, settings.lexical_search,
                          over_fetch=4 if settings.passage_tokens else 1)
    chunker = Chunker(settings.tokenizer_file, settings.chunk_tokens, settings.chunk_overlap_tokens,
                      settings.passage_tokens)
    host = ServiceHost("retrieval", settings)
    retrieval_pb2_grpc.add_RetrievalServicer_to_server(
        RetrievalService(settings, index, chunker, service_pb2_grpc.GRPCInferenceServiceStub(router_channel)),
        host.server)
    host.expose([retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name])

    async def index_ready() -> bool:
        # Reconnects (with a new client) after an outage.
        return index.ready or await index.connect()

    try:
        await host.run(background=[host.serving_while(index_ready)])
    finally:
        await index.close()
        await router_channel.close()


def main() -> None:
    run_service("retrieval", RetrievalSettings, serve)
