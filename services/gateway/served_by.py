"""What served a request, as the router stamped it on the last KServe response, copied into the public metadata."""

from __future__ import annotations

from tritonclient.grpc import service_pb2

from inference_mesh.v1 import mesh_pb2
from services.common.kserve import int_parameter, string_parameter


def record_placement(response: service_pb2.ModelInferResponse, metadata: mesh_pb2.ResponseMetadata) -> None:
    metadata.model_version = string_parameter(response, "mesh_model_version")
    metadata.pool = string_parameter(response, "mesh_pool")
    metadata.replica = string_parameter(response, "mesh_replica")
    metadata.fallback = string_parameter(response, "mesh_fallback")
    metadata.retries = int_parameter(response, "mesh_retries")
    metadata.resumed = int_parameter(response, "mesh_resumed")
