"""Embed: cached vectors first (per text), the misses through the router, the order kept."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2_grpc

from services.common.embeddings import embed_via_kserve
from services.common.errors import bug
from services.gateway.errors import from_rpc_error
from services.gateway.plan import RequestPlan
from services.gateway.served_by import record_placement


async def embed_texts(router: service_pb2_grpc.GRPCInferenceServiceStub, plan: RequestPlan,
                      texts: list[str]) -> np.ndarray:
    """The vectors, in order; the placement of the last batch is recorded on the plan's metadata."""
    model = plan.model
    try:
        vectors, last = await embed_via_kserve(router, model.name, texts, model.max_batch_size, plan.timeout_s,
                                               plan.metadata.request_id, plan.headers, model.version)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, "router") from exc
    if vectors.shape[-1] != model.dimension:
        raise bug(f"model returned dimension {vectors.shape[-1]}, registry says {model.dimension}")
    record_placement(last, plan.metadata)
    return vectors
