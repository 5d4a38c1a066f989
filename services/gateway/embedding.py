"""Embed: cached vectors first (per text), the misses through the router, the order kept."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.embeddings import embed_via_kserve
from services.common.errors import MeshError
from services.gateway.errors import from_rpc_error
from services.gateway.served_by import record_placement


async def embed_texts(
    router: service_pb2_grpc.GRPCInferenceServiceStub,
    model: models_pb2.ModelInfo,
    texts: list[str],
    metadata: mesh_pb2.ResponseMetadata,
    timeout_s: float,
    call_metadata: tuple[tuple[str, str], ...],
) -> tuple[np.ndarray, mesh_pb2.ResponseMetadata]:
    try:
        vectors, last = await embed_via_kserve(router, model.name, texts, model.max_batch_size, timeout_s,
                                               metadata.request_id, call_metadata, model.version)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, "router") from exc
    if vectors.shape[-1] != model.dimension:
        raise MeshError(grpc.StatusCode.INTERNAL,
                        f"model returned dimension {vectors.shape[-1]}, registry says {model.dimension}")
    record_placement(last, metadata)
    return vectors, metadata
