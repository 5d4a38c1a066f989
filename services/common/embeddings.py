"""Embedding texts through a KServe endpoint (the router): split to the model's batch size, keep the order."""

from __future__ import annotations

import asyncio

import numpy as np
from tritonclient.grpc import service_pb2_grpc

from services.common.kserve import InferRequestBuilder, output_arrays


async def embed_via_kserve(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    model: str,
    texts: list[str],
    max_batch_size: int,
    timeout_s: float,
    request_id: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
    version: str = "",
) -> tuple[np.ndarray, object]:
    """Vectors (len(texts) x dim, float32) and the last KServe response (for its placement parameters)."""
    step = max_batch_size or len(texts)
    parts = [texts[i : i + step] for i in range(0, len(texts), step)]

    async def one(part: list[str]):
        request = InferRequestBuilder(model, request_id, version).add_bytes(
            "TEXT", [t.encode("utf-8") for t in part], shape=[len(part), 1]).build()
        return await stub.ModelInfer(request, timeout=timeout_s, metadata=metadata)

    responses = await asyncio.gather(*(one(p) for p in parts))
    vectors = np.concatenate([output_arrays(r)["EMBEDDING"] for r in responses]).astype(np.float32, copy=False)
    return vectors, responses[-1]
