"""OpenTelemetry tracing for every service, on when an OTLP endpoint is set and off (no interceptors, no cost)
when none is: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT (gRPC, e.g.
http://otel-collector:4317), with the SDK's other OTEL_* variables (sampler, headers) honoured as usual.

Spans come from opentelemetry-instrumentation-grpc's interceptors on every gRPC server and client, so the W3C
trace context travels in gRPC metadata (traceparent) from Envoy through the services to Triton.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import grpc
from opentelemetry import trace

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_provider = None


def tracing_endpoint() -> str:
    return next((os.environ[v] for v in _ENDPOINT_VARIABLES if os.environ.get(v)), "")


def setup_tracing(service: str) -> bool:
    """Installs the tracer provider for this process once; False (and nothing installed) without an endpoint."""
    global _provider
    if _provider is not None:
        return True
    if not tracing_endpoint() or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service),
                                                        "service.namespace": "inference-mesh"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown_tracing() -> None:
    """Exports what is buffered (called on exit)."""
    if _provider is not None:
        _provider.shutdown()


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor()]


def client_interceptors() -> list:
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    return list(aio_client_interceptors())


def current_trace_id() -> str:
    """The active span's trace id as 32 hex digits, or "" outside a sampled trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


@contextlib.contextmanager
def http_server_span(method: str, route: str, headers: Mapping[str, str]) -> Iterator[None]:
    """A server span for an HTTP request, child of the caller's W3C trace context (Envoy's traceparent); the
    gRPC client interceptors carry it on to the router and Triton. Nothing when tracing is off."""
    if _provider is None:
        yield
        return
    from opentelemetry.propagate import extract
    tracer = trace.get_tracer("inference_mesh.http")
    with tracer.start_as_current_span(f"{method} {route}", context=extract(headers), kind=trace.SpanKind.SERVER,
                                      attributes={"http.request.method": method, "http.route": route}):
        yield
