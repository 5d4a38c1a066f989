"""A real OTLP trace receiver for tests: OTLP/gRPC (TraceService/Export, what the services and Envoy send) and
OTLP/HTTP protobuf (POST /v1/traces, what Triton sends), on loopback, keeping every span it is given."""

from __future__ import annotations

import gzip
import json
import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tools.processes import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int


def _kind(kind: int | str) -> int:
    return kind if isinstance(kind, int) else trace_pb2.Span.SpanKind.Value(kind)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.grpc_port = free_port()
        self.http_port = free_port()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), self._http_handler())

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def keep(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                received += [ReceivedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                          span.parent_span_id.hex(), span.kind) for span in scope.spans]
        with self._lock:
            self.spans.extend(received)

    def keep_json(self, document: dict) -> None:
        """OTLP/JSON: camelCase fields, trace and span ids as hex strings."""
        received = []
        for resource_spans in document.get("resourceSpans", []):
            attributes = resource_spans.get("resource", {}).get("attributes", [])
            service = next((a["value"].get("stringValue", "") for a in attributes if a["key"] == "service.name"), "")
            for scope in resource_spans.get("scopeSpans", []):
                received += [ReceivedSpan(service, span.get("name", ""), span.get("traceId", "").lower(),
                                          span.get("spanId", "").lower(), span.get("parentSpanId", "").lower(),
                                          _kind(span.get("kind", 0))) for span in scope.get("spans", [])]
        with self._lock:
            self.spans.extend(received)

    def Export(self, request, context):
        self.keep(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def _http_handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if "json" in self.headers.get("Content-Type", ""):
                    receiver.keep_json(json.loads(body))  # opentelemetry-cpp (Triton) sends OTLP/JSON
                else:
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.keep(request)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                return None

        return Handler

    def start(self) -> OtlpReceiver:
        self._grpc.start()
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._grpc.stop(1)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]
