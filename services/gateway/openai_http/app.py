"""The HTTP server: OpenAI's routes over the gateway's core, server-sent events for streams, errors in OpenAI's
shape. aiohttp runs on the gateway's own event loop beside grpc.aio: a request costs no extra hop, and a client
that goes away cancels its handler (handler_cancellation), which cancels the router stream and so the Triton
request."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import grpc
import pydantic
from aiohttp import web
from prometheus_client import Counter, Histogram

from inference_mesh.v1 import cache_pb2, mesh_pb2, models_pb2
from services.common.errors import (
    MeshError,
    adopt_request_id,
    denied,
    exhausted,
    internal_failure,
    not_found,
    unauthenticated,
    unavailable,
)
from services.common.internal_tls import peer_identity_of_certificate, refusal
from services.common.shedding import LoadShedder
from services.common.telemetry import http_server_span
from services.gateway.admin_http import AdminHttp
from services.gateway.auth import Authenticator, Caller
from services.gateway.core import Generation, MeshCore
from services.gateway.openai_http import convert, openapi, responses
from services.gateway.openai_http.errors import (
    NOT_A_ROUTE,
    REQUEST_TOO_LARGE,
    WRONG_METHOD,
    OpenAIError,
    from_mesh_error,
    invalid_body,
)
from services.gateway.openai_http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    WrongHitReport,
)
from services.gateway.response_store import ResponseStore, new_response_id

log = logging.getLogger(__name__)

REQUESTS = Counter("mesh_http_requests_total", "OpenAI-compatible HTTP requests, by route and status",
                   ["route", "status"])
LATENCY = Histogram("mesh_http_request_seconds", "OpenAI-compatible HTTP requests: time to the response headers",
                    ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

# The openai SDK sends its own timeout with each request: the caller's deadline, as gRPC's grpc-timeout is.
_CLIENT_TIMEOUT_HEADER = "x-stainless-timeout"
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                "x-accel-buffering": "no"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes(Protocol):
    """Routes served beside OpenAI's inference ones, with this API's caller identification."""

    def add_routes(self, app: web.Application, caller: Callable[[web.Request], Caller]) -> None: ...

_NO_LAST_CHUNK = "the generation ended without its last chunk"


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _event(value: object) -> bytes:
    return b"data: " + _json(value) + b"\n\n"


def _error_response(error: OpenAIError) -> web.Response:
    return web.Response(status=error.kind.status, body=_json(error.body()), content_type="application/json",
                        headers=error.headers)


def _remaining_s(request: web.Request) -> float | None:
    raw = request.headers.get(_CLIENT_TIMEOUT_HEADER, "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def parsed_body(model: type[pydantic.BaseModel], raw: bytes) -> pydantic.BaseModel:
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        problem = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            raise invalid_body(f"Unrecognized request argument supplied: {where}", where) from None
        if problem["type"] == "json_invalid":
            raise invalid_body(f"the body is not valid JSON: {problem['msg']}") from None
        raise invalid_body(f"{where}: {problem['msg']}" if where else problem["msg"], where or None) from None


def _mesh_headers(metadata: mesh_pb2.ResponseMetadata) -> dict[str, str]:
    headers = {"x-request-id": metadata.request_id}
    if status := convert.CACHE_STATUS.get(metadata.cache_status):
        headers["x-mesh-cache"] = status
    return headers


class OpenAIApi:
    def __init__(self, auth: Authenticator, core: MeshCore, shedder: LoadShedder | None,
                 is_ready: Callable[[], bool], max_body_bytes: int, internal_tls: bool = False,
                 response_store: ResponseStore | None = None, admin: AdminHttp | None = None,
                 batches: Routes | None = None) -> None:
        self._admin = admin
        self._batches = batches
        self._internal_tls = internal_tls
        self._response_store = response_store
        self._auth = auth
        self._core = core
        self._shedder = shedder
        self._is_ready = is_ready
        self._max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._answered])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/responses/{response_id}", self.stored_response)
        app.router.add_delete("/v1/responses/{response_id}", self.stored_response)
        app.router.add_get("/v1/openapi.json", self.openapi)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/mesh/cache/wrong-hit", self.report_wrong_hit)
        app.router.add_get("/health", self.health)
        if self._admin is not None:
            self._admin.add_routes(app)
        if self._batches is not None:
            self._batches.add_routes(app, self._caller)
        return app

    @web.middleware
    async def _answered(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure in OpenAI's shape; metrics, a server span and the in-flight bound around each call."""
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        started = time.perf_counter()
        entered, party = False, None
        status = 500
        adopt_request_id(((key.lower(), value) for key, value in request.headers.items()))
        try:
            with http_server_span(request.method, route, request.headers):
                self._check_peer(request)
                if route != "/health" and self._shedder is not None:
                    party = self._shedder.party(tuple(request.headers.items()))
                    if not self._shedder.enter(party):
                        raise from_mesh_error(exhausted(self._shedder.refusal(party), retry_after_s=1))
                    entered = True
                try:
                    response = await handler(request)
                except web.HTTPRequestEntityTooLarge as exc:
                    raise OpenAIError(REQUEST_TOO_LARGE, exc.text or "request body too large") from None
                except web.HTTPMethodNotAllowed:
                    raise OpenAIError(WRONG_METHOD, f"{request.method} is not allowed on {request.path}") from None
                except web.HTTPNotFound:
                    raise OpenAIError(NOT_A_ROUTE, f"no route {request.method} {request.path}; see "
                                                   "docs/openai-api.md") from None
                except MeshError as exc:
                    raise from_mesh_error(exc) from exc
                status = response.status
                return response
        except OpenAIError as exc:
            status = exc.kind.status
            return _error_response(exc)
        except web.HTTPException:
            raise
        except Exception as exc:
            # A bug: its text (a traceback's last line) is not for the caller; the log has it, by request id.
            log.error("unexpected error", exc_info=exc, extra={"route": route})
            error = from_mesh_error(internal_failure(f"{request.method} {route} failed inside the mesh",
                                                     f"{type(exc).__name__}: {exc}", grpc.StatusCode.INTERNAL))
            status = error.kind.status
            return _error_response(error)
        finally:
            if entered:
                self._shedder.release(party)
            REQUESTS.labels(route, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)

    def _check_peer(self, request: web.Request) -> None:
        """With internal mTLS, only the identities allowed to call a gateway (Envoy's) get past the handshake."""
        if not self._internal_tls or request.transport is None:
            return
        identity = peer_identity_of_certificate(request.transport.get_extra_info("peercert"))
        if why := refusal("gateway", request.path, identity):
            raise from_mesh_error(denied(why))

    def _caller(self, request: web.Request) -> Caller:
        caller, problem = self._auth.identify(tuple(request.headers.items()))
        if caller is None:
            raise from_mesh_error(unauthenticated(problem))
        return caller

    async def _body(self, request: web.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
        if request.content_type != "application/json":
            raise invalid_body(f"send the body as application/json, not {request.content_type or 'nothing'}")
        return parsed_body(model, await request.read())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        if body.retrieval is not None:
            # No max_tokens: Ask's own default (an answer from documents is short), not the model's maximum.
            generation = await self._core.ask(caller, convert.ask_request(body, body.output_limit() or 0),
                                              _remaining_s(request))
        else:
            max_tokens = body.output_limit() or await self._core.output_limit(body.model)
            generation = await self._core.generate(caller, convert.chat_request(body, max_tokens),
                                                   _remaining_s(request))
        return await _answer(request, body, generation, convert.ChatEnvelope(generation.metadata.request_id,
                                                                             body.model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        body: CompletionRequest = await self._body(request, CompletionRequest)
        max_tokens = body.output_limit() or await self._core.output_limit(body.model)
        generation = await self._core.generate(caller, convert.completion_request(body, max_tokens),
                                               _remaining_s(request))
        return await _answer(request, body, generation,
                             convert.CompletionEnvelope(generation.metadata.request_id, body.model))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: the same generation as a chat completion, OpenAI's newer shapes; kept (store, the
        default) for previous_response_id and GET/DELETE when this deployment has a response store."""
        caller = self._caller(request)
        body: ResponsesRequest = await self._body(request, ResponsesRequest)
        store = self._response_store
        if store is None and (body.store or body.previous_response_id):
            raise invalid_body("this deployment keeps no responses (it runs without a cache service): send store "
                               "false and the earlier turns in input", "store")
        history: list[mesh_pb2.ChatMessage] = []
        if body.previous_response_id:
            previous = await store.get(caller.tenant, body.previous_response_id)
            if previous is None:
                raise invalid_body(f"no response {body.previous_response_id!r} is stored for this key's tenant "
                                   "(responses are kept 30 days)", "previous_response_id")
            history = list(previous.conversation)
        max_tokens = body.max_output_tokens or await self._core.output_limit(body.model)
        generate = responses.generate_request(body, max_tokens, history)
        generation = await self._core.generate(caller, generate, _remaining_s(request))
        keep = store is not None and body.store is not False
        envelope = responses.ResponseEnvelope(body, new_response_id(), stored=keep)

        async def finished(text: str, last: mesh_pb2.GenerateChunk, answer: dict) -> None:
            if keep:
                await store.put(caller.tenant, cache_pb2.StoredResponse(
                    id=envelope.id, conversation=responses.conversation(body, generate, text, last),
                    response_json=json.dumps(answer, ensure_ascii=False)))

        if not body.stream:
            text, last = await collected(generation)
            answer = envelope.whole(text, last)
            await finished(text, last, answer)
            return web.Response(body=_json(answer), content_type="application/json",
                                headers=_mesh_headers(last.metadata))
        return await _streamed_events(request, generation, envelope, finished)

    async def stored_response(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        response_id = request.match_info["response_id"]
        store = self._response_store
        missing = not_found(f"no response {response_id[:64]!r} is stored for this key's tenant")
        if store is None:
            raise from_mesh_error(missing)
        if request.method == "DELETE":
            if not await store.delete(caller.tenant, response_id):
                raise from_mesh_error(missing)
            return web.Response(body=_json({"id": response_id, "object": "response.deleted", "deleted": True}),
                                content_type="application/json")
        stored = await store.get(caller.tenant, response_id)
        if stored is None:
            raise from_mesh_error(missing)
        return web.Response(body=stored.response_json.encode("utf-8"), content_type="application/json")

    async def report_wrong_hit(self, request: web.Request) -> web.Response:
        """Mesh extension: ReportWrongCacheHit for a chat completion (docs/openai-api.md)."""
        caller = self._caller(request)
        body: WrongHitReport = await self._body(request, WrongHitReport)
        if body.retrieval is not None:
            raise invalid_body("answers from documents are not cached semantically; nothing to report", "retrieval")
        max_tokens = body.output_limit() or await self._core.output_limit(body.model)
        answer = await self._core.report_wrong_cache_hit(caller, mesh_pb2.ReportWrongCacheHitRequest(
            request=convert.chat_request(body, max_tokens), cache_entry=body.cache_entry), _remaining_s(request))
        return web.Response(body=_json({"recorded": answer.recorded}), content_type="application/json")

    async def embeddings(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        body: EmbeddingRequest = await self._body(request, EmbeddingRequest)
        model = await self._core.model(caller, body.model, models_pb2.MODEL_KIND_EMBED)
        convert.check_dimensions(body, model.dimension)
        response = await self._core.embed(caller, convert.embed_request(body), _remaining_s(request))
        return web.Response(body=_json(convert.embeddings(body, response)), content_type="application/json",
                            headers=_mesh_headers(response.metadata))

    async def _entries(self) -> list[dict]:
        kinds = {models_pb2.MODEL_KIND_GENERATE: "generate", models_pb2.MODEL_KIND_EMBED: "embed"}
        models = await self._core.models()
        entries = [convert.model_entry(m.name, kinds.get(m.kind, "other")) for m in models]
        entries += [convert.model_entry(g.name, "group") for g in self._core.catalog.groups()]
        return sorted(entries, key=lambda entry: entry["id"])

    async def list_models(self, request: web.Request) -> web.Response:
        self._caller(request)
        return web.Response(body=_json({"object": "list", "data": await self._entries()}),
                            content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        self._caller(request)
        name = request.match_info["model"]
        for entry in await self._entries():
            if entry["id"] == name:
                return web.Response(body=_json(entry), content_type="application/json")
        raise from_mesh_error(not_found(f"The model {name!r} does not exist; "
                                        "GET /v1/models lists the models this key can use"))

    async def openapi(self, request: web.Request) -> web.Response:
        """The API's description is public (no key): a client generator needs it before it has one."""
        return web.Response(body=_json(openapi.document()), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._is_ready() else 503, text="ok" if self._is_ready() else "not ready")


async def collected(generation: Generation) -> tuple[str, mesh_pb2.GenerateChunk]:
    texts: list[str] = []
    try:
        async for chunk in generation.chunks:
            texts.append(chunk.text)
            if chunk.finish_reason:
                return "".join(texts), _completed(chunk)
    finally:
        # Closed before the response is sent (as a stream is): the generation's own endings (its request log
        # line, the cache store) run now, not whenever the abandoned generator is collected.
        await generation.chunks.aclose()
    raise from_mesh_error(unavailable(_NO_LAST_CHUNK))


def _completed(last: mesh_pb2.GenerateChunk) -> mesh_pb2.GenerateChunk:
    if convert.finish_reason(last) is None:
        raise from_mesh_error(unavailable("the generation was cancelled before it finished; retry"))
    return last


async def _streamed_events(request: web.Request, generation: Generation, envelope: responses.ResponseEnvelope,
                           finished: Callable[[str, mesh_pb2.GenerateChunk, dict], Awaitable[None]]
                           ) -> web.StreamResponse:
    """The Responses API's server-sent events (`event:` names the type; no [DONE] line, as OpenAI's)."""
    chunks: AsyncIterator[mesh_pb2.GenerateChunk] = generation.chunks
    head = await anext(chunks)

    async def from_head() -> AsyncIterator[mesh_pb2.GenerateChunk]:
        yield head
        async for chunk in chunks:
            yield chunk

    response = web.StreamResponse(headers={**_SSE_HEADERS, **_mesh_headers(generation.metadata)})
    await response.prepare(request)
    ended = False
    try:
        async for event in envelope.events(from_head(), finished):
            ended = event["type"] in ("response.completed", "response.incomplete")
            await response.write(b"event: " + event["type"].encode() + b"\n" + _event(event))
        if not ended:
            raise from_mesh_error(unavailable(_NO_LAST_CHUNK))
    except (MeshError, OpenAIError) as exc:
        error = (from_mesh_error(exc) if isinstance(exc, MeshError) else exc).body()["error"]
        await response.write(b"event: error\n" + _event(envelope.event("error", code=error["code"],
                                                                        message=error["message"], param=None)))
    finally:
        await chunks.aclose()
    await response.write_eof()
    return response


async def _answer(request: web.Request, body: ChatCompletionRequest | CompletionRequest, generation: Generation,
                  envelope: convert.Envelope) -> web.StreamResponse:
    if not body.stream:
        text, last = await collected(generation)
        return web.Response(body=_json(envelope.whole(text, last)), content_type="application/json",
                            headers=_mesh_headers(last.metadata))
    return await _streamed(request, generation, envelope,
                           body.stream_options is not None and body.stream_options.include_usage)


async def _streamed(request: web.Request, generation: Generation, envelope: convert.Envelope,
                    include_usage: bool) -> web.StreamResponse:
    """Server-sent events. The first chunk is awaited before the headers: the cache status is known by then, and
    a failure before any token is still an HTTP status the client's error classes read."""
    chunks: AsyncIterator[mesh_pb2.GenerateChunk] = generation.chunks
    head = await anext(chunks)
    response = web.StreamResponse(headers={**_SSE_HEADERS, **_mesh_headers(generation.metadata)})
    await response.prepare(request)
    if (opening := envelope.opening()) is not None:
        await response.write(_event(opening))
    try:
        chunk: mesh_pb2.GenerateChunk | None = head
        while chunk is not None:
            if chunk.text:
                await response.write(_event(envelope.delta(chunk.text)))
            if chunk.finish_reason:
                last = _completed(chunk)
                for delta in envelope.tool_call_deltas(last):
                    await response.write(_event(delta))
                await response.write(_event(envelope.finish(last)))
                if include_usage:
                    await response.write(_event(envelope.usage_chunk(last)))
                break
            chunk = await anext(chunks, None)
        else:
            raise from_mesh_error(unavailable(_NO_LAST_CHUNK))
    except MeshError as exc:
        # After the headers an error can only be an event; the openai SDK raises it as an APIError.
        await response.write(_event(from_mesh_error(exc).body()))
    except OpenAIError as exc:
        await response.write(_event(exc.body()))
    finally:
        await chunks.aclose()
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
