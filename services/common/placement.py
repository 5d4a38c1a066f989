"""How a placement is written on KServe messages, by whoever carries the stream (the router's relay, or a gateway
streaming on the router's lease): the request aimed at the chosen Triton model, and the last response stamped with
where it ran, in the parameters the gateway's served_by reads back."""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import service_pb2

from services.common.wire import SPILL_PARAMETER


def aim(request: service_pb2.ModelInferRequest, triton_model: str, version: str, spilled: bool) -> None:
    """The one rewrite of a request on its way to a replica: the Triton model and version of the placement, and
    whether the replica should keep the prompt's prefix (not when the request was spilled off its home)."""
    request.model_name = triton_model
    request.model_version = version
    if spilled:
        request.parameters[SPILL_PARAMETER].bool_param = True
    elif SPILL_PARAMETER in request.parameters:
        del request.parameters[SPILL_PARAMETER]


@dataclass(frozen=True)
class ServedBy:
    pool: str
    replica: str
    model_version: str  # the registry's, when the replica's response names none
    fallback: str = ""
    retries: int = 0
    resumed: int = 0


def stamp(response: service_pb2.ModelInferResponse, public_name: str, served: ServedBy) -> None:
    """Placement is read from the last response; stamping every token would cost for nothing."""
    response.model_name = public_name
    parameters = response.parameters
    parameters["mesh_pool"].string_param = served.pool
    parameters["mesh_replica"].string_param = served.replica
    parameters["mesh_model_version"].string_param = response.model_version or served.model_version
    if served.fallback:
        parameters["mesh_fallback"].string_param = served.fallback
    if served.retries:
        parameters["mesh_retries"].int64_param = served.retries
    if served.resumed:
        parameters["mesh_resumed"].int64_param = served.resumed
