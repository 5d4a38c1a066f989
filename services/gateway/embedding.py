"""Embed: split the batch to the model's max batch size, send the parts concurrently, keep the order."""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.kserve import InferRequestBuilder, output_arrays, string_parameter
from services.gateway.errors import RequestError, from_rpc_error


async def embed_texts(
    router: service_pb2_grpc.GRPCInferenceServiceStub,
    model: models_pb2.ModelInfo,
    texts: list[str],
    metadata: mesh_pb2.ResponseMetadata,
    timeout_s: float,
    call_metadata: tuple[tuple[str, str], ...],
) -> mesh_pb2.EmbedResponse:
    step = model.max_batch_size or len(texts)
    parts = [texts[i : i + step] for i in range(0, len(texts), step)]

    async def one(part: list[str]):
        request = InferRequestBuilder(model.name, metadata.request_id).add_bytes(
            "TEXT", [t.encode("utf-8") for t in part], shape=[len(part), 1]).build()
        return await router.ModelInfer(request, timeout=timeout_s, metadata=call_metadata)

    try:
        responses = await asyncio.gather(*(one(p) for p in parts))
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, "router") from exc
    response = mesh_pb2.EmbedResponse(dimension=model.dimension)
    for answer in responses:
        vectors = output_arrays(answer)["EMBEDDING"]
        if vectors.shape[-1] != model.dimension:
            raise RequestError(grpc.StatusCode.INTERNAL,
                               f"model returned dimension {vectors.shape[-1]}, registry says {model.dimension}")
        for vector in vectors:
            response.embeddings.add().values.extend(vector.tolist())
    last = responses[-1]
    metadata.model_version = string_parameter(last, "mesh_model_version")
    metadata.pool = string_parameter(last, "mesh_pool")
    metadata.replica = string_parameter(last, "mesh_replica")
    response.metadata.CopyFrom(metadata)
    return response
