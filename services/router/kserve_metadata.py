"""What stock Triton tooling asks besides inference (tritonclient's get_model_config, get_inference_statistics,
get_model_repository_index), answered for the mesh's public model names: a config from a replica that serves
the model, statistics summed over every replica that hosts it, and a read-only index of the registry."""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2

from services.common.errors import MeshError, unavailable
from services.router.registry import ModelSpec
from services.router.replicas import Replica


def hosting(replicas: list[Replica], spec: ModelSpec) -> list[Replica]:
    """The replicas in the model's pools that have its Triton model loaded (drained ones too: their past work
    counts in statistics)."""
    pools = set(spec.pool_names)
    return [r for r in replicas if r.pool in pools and spec.triton_model in r.ready_models]


def _add(total: service_pb2.StatisticDuration, part: service_pb2.StatisticDuration) -> None:
    total.count += part.count
    total.ns += part.ns


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
              "cache_miss")


def merge_statistics(public_name: str, answers: list[service_pb2.ModelStatisticsResponse]
                     ) -> list[service_pb2.ModelStatistics]:
    """Per version: counts and durations added up over replicas, the latest inference time kept."""
    merged: dict[str, service_pb2.ModelStatistics] = {}
    for answer in answers:
        for stats in answer.model_stats:
            total = merged.setdefault(stats.version, service_pb2.ModelStatistics(name=public_name,
                                                                                 version=stats.version))
            total.last_inference = max(total.last_inference, stats.last_inference)
            total.inference_count += stats.inference_count
            total.execution_count += stats.execution_count
            for field in _DURATIONS:
                _add(getattr(total.inference_stats, field), getattr(stats.inference_stats, field))
            batches = {b.batch_size: b for b in total.batch_stats}
            for batch in stats.batch_stats:
                into = batches.get(batch.batch_size)
                if into is None:
                    into = total.batch_stats.add(batch_size=batch.batch_size)
                    batches[batch.batch_size] = into
                for field in ("compute_input", "compute_infer", "compute_output"):
                    _add(getattr(into, field), getattr(batch, field))
    return [merged[version] for version in sorted(merged)]


async def model_metadata(spec: ModelSpec, public_name: str, replicas: list[Replica],
                         timeout_s: float) -> service_pb2.ModelMetadataResponse:
    """Read from the least busy hosting replica whatever its generation load: a metadata read is not a
    generation and takes no generation slot (it waited behind them, or was refused at their bound)."""
    if not replicas:
        raise unavailable(f"no replica has {public_name!r} loaded; its metadata cannot be read now")
    replica = min(replicas, key=lambda r: r.in_flight)
    try:
        answer = await replica.stub.ModelMetadata(service_pb2.ModelMetadataRequest(
            name=spec.triton_model, version=spec.version), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise MeshError(exc.code(), f"{replica.name}: {exc.details()}") from exc
    answer.name = public_name
    return answer


async def model_config(spec: ModelSpec, public_name: str, version: str, replicas: list[Replica],
                       timeout_s: float) -> service_pb2.ModelConfigResponse:
    if not replicas:
        raise unavailable(f"no replica has {public_name!r} loaded; its configuration cannot be read now")
    try:
        answer = await replicas[0].stub.ModelConfig(service_pb2.ModelConfigRequest(
            name=spec.triton_model, version=version or spec.version), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise MeshError(exc.code(), f"{replicas[0].name}: {exc.details()}") from exc
    answer.config.name = public_name
    return answer


async def model_statistics(spec: ModelSpec, public_name: str, version: str, replicas: list[Replica],
                           timeout_s: float) -> list[service_pb2.ModelStatistics]:
    """Every hosting replica is asked at once; one that does not answer is left out of the sum (its numbers
    return when it does), unless none answers."""
    request = service_pb2.ModelStatisticsRequest(name=spec.triton_model, version=version)
    answers = await asyncio.gather(*(r.stub.ModelStatistics(request, timeout=timeout_s) for r in replicas),
                                   return_exceptions=True)
    received = [a for a in answers if isinstance(a, service_pb2.ModelStatisticsResponse)]
    if replicas and not received:
        failure = next(a for a in answers if isinstance(a, BaseException))
        code = failure.code() if isinstance(failure, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
        raise MeshError(code, f"no replica of {public_name!r} answered for statistics: {failure}")
    return merge_statistics(public_name, received)
