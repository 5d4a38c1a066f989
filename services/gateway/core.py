"""The gateway's core: one request from an identified caller, validated, planned and orchestrated (cache →
retrieval → router), whatever protocol it came in by. The gRPC InferenceMesh service (mesh_service.py) and the
OpenAI-compatible HTTP API (services/gateway/openai_http/) are thin adapters over it; neither decides anything the
other does not.

`remaining_s` is what is left of the caller's deadline (None: no deadline); every downstream call gets at most
that, less a margin."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import cache_pb2, mesh_pb2, models_pb2, retrieval_pb2
from services.admin.usage import UsageRecord, UsageWriter
from services.common.deadlines import within
from services.common.errors import MeshError, invalid, unavailable
from services.common.model_catalog import ModelCatalog
from services.gateway import cached_generation, rag
from services.gateway.auth import Caller
from services.gateway.budgets import SETTLE_MARGIN_S, TokenBudgets, input_tokens, metered
from services.gateway.cache_client import CacheClient
from services.gateway.documents import DocumentsRelay
from services.gateway.embedding import embed_texts
from services.gateway.genai_metrics import observed
from services.gateway.generation import GenerationStreams
from services.gateway.plan import RequestPlan, estimated_cost, plan_request
from services.gateway.request_log import GenerationLog, cost_of, prompt_text
from services.gateway.routing_hints import affinity_key, group_member
from services.gateway.settings import GatewaySettings
from services.gateway.tools import uses_tools, with_tool_calls
from services.gateway.validation import check_embed, check_generate, check_model, check_request_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """A started generation: its metadata (cache status and request id known before the first chunk, placement
    and usage by the last) and its chunks, which must be read to the end or closed."""

    metadata: mesh_pb2.ResponseMetadata
    chunks: AsyncIterator[mesh_pb2.GenerateChunk]


async def _logged(chunks: AsyncIterator[mesh_pb2.GenerateChunk],
                  record: GenerationLog) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    try:
        async for chunk in chunks:
            record.seen(chunk)
            yield chunk
    except MeshError as exc:
        record.failed(exc)
        raise
    except (asyncio.CancelledError, GeneratorExit):
        record.cancelled()
        raise
    finally:
        record.write()


def _embed_usage(caller: Caller, model: models_pb2.ModelInfo, plan: RequestPlan, response: mesh_pb2.EmbedResponse,
                 texts: list[str], started: float) -> UsageRecord:
    """An Embed's usage: its input tokens as the budget counts them; vectors from the cache saved theirs."""
    meta = response.metadata
    tokens = input_tokens(texts)
    saved = tokens - plan.delivered.prompt_tokens
    return UsageRecord(
        at=time.time(), tenant=caller.tenant, key_id=caller.key_id, kind="embed", model=model.name,
        version=meta.model_version, pool=meta.pool, request_id=meta.request_id, status="OK",
        cache=mesh_pb2.CacheStatus.Name(meta.cache_status), input_tokens=tokens, output_tokens=0,
        cached_tokens=saved, latency_ms=round((time.perf_counter() - started) * 1000, 1), ttft_ms=None,
        cost_usd=cost_of(model, meta.pool, tokens - saved, plan.discount))


async def _listed(chunks: list[mesh_pb2.GenerateChunk]) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    for chunk in chunks:
        yield chunk


async def _cited(chunks: AsyncIterator[mesh_pb2.GenerateChunk],
                 citations: list[mesh_pb2.Citation]) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    async for chunk in chunks:
        if chunk.finish_reason:
            chunk.metadata.citations.extend(citations)
        yield chunk


class MeshCore:
    def __init__(self, settings: GatewaySettings, catalog: ModelCatalog,
                 router: service_pb2_grpc.GRPCInferenceServiceStub, streams: GenerationStreams,
                 cache: CacheClient | None, documents: DocumentsRelay, budgets: TokenBudgets | None = None,
                 usage: UsageWriter | None = None) -> None:
        self._usage = usage
        self.settings = settings
        self.catalog = catalog
        self.documents = documents
        self._router = router
        self._cache = cache
        self._budgets = budgets
        self._streams = streams

    async def _cascade(self, request: mesh_pb2.GenerateRequest) -> tuple[mesh_pb2.GenerateRequest, str]:
        """A request naming a model group, rewritten to the member the group's rule picks."""
        await self.catalog.get(request.model)
        group = self.catalog.group(request.model)
        if group is None:
            return request, ""
        chosen = mesh_pb2.GenerateRequest()
        chosen.CopyFrom(request)
        chosen.model = group_member(group, request)
        return chosen, group.name

    async def model(self, caller: Caller, name: str, kind: models_pb2.ModelKind.ValueType) -> models_pb2.ModelInfo:
        """The model a request names, if it exists, serves this kind, and the caller's key may use it."""
        model = check_model(name, await self.catalog.get(name), self.catalog.all(), kind)
        caller.may_use(model.name)
        return model

    async def _generate(self, request: mesh_pb2.GenerateRequest, plan: RequestPlan):
        """The cached generation, admitted and charged against the tenant's token budget."""
        plan.metadata.model_version = plan.model.version
        chunks = cached_generation.generate(self._cache, self._streams, request, plan)
        chunks = observed(chunks, plan.caller.tenant, plan.model.name)
        if self._budgets is None:
            return chunks
        # The worst case is held before the generation starts (and the rest given back when it ends), so that a
        # tenant's concurrent streams cannot spend past its budget together.
        reservation = await self._budgets.reserve(plan.caller, plan.cost, plan.timeout_s + SETTLE_MARGIN_S)
        return metered(self._budgets, plan.caller, chunks, reservation, plan.delivered)

    async def generate(self, caller: Caller, request: mesh_pb2.GenerateRequest,
                       remaining_s: float | None) -> Generation:
        """Validated, planned and admitted here (errors raise now); the tokens come from the result's chunks."""
        record = GenerationLog("generate", caller.tenant, request.model, self.settings.log_prompts, caller.key_id,
                               self._usage)
        try:
            request, group = await self._cascade(request)
            record.prompt = prompt_text(request) if self.settings.log_prompts else ""
            model = await self.model(caller, request.model, models_pb2.MODEL_KIND_GENERATE)
            check_generate(request, model, self.settings.limits)
            plan = plan_request(caller, model, request.request_id,
                                within(self.settings.generate_timeout_s, remaining_s),
                                session=request.session_id, group=group,
                                affinity=affinity_key(request, self.settings.affinity_min_prefix_chars),
                                priority=request.priority, cost=estimated_cost(request))
            record.model_info, record.delivered, record.discount = model, plan.delivered, plan.discount
            chunks = await self._generate(request, plan)
            if uses_tools(request):
                chunks = with_tool_calls(chunks)
            return Generation(plan.metadata, _logged(chunks, record))
        except MeshError as exc:
            record.failed(exc)
            record.write()
            raise

    async def embed(self, caller: Caller, request: mesh_pb2.EmbedRequest,
                    remaining_s: float | None) -> mesh_pb2.EmbedResponse:
        model = await self.model(caller, request.model, models_pb2.MODEL_KIND_EMBED)
        check_embed(request, self.settings.limits)
        texts = list(request.texts)
        plan = plan_request(caller, model, request.request_id, within(self.settings.embed_timeout_s, remaining_s),
                            priority=request.priority, cost=input_tokens(texts))
        if self._budgets is not None:
            await self._budgets.admit(caller)
        started = time.perf_counter()
        response = await self._embed(texts, request.cache_mode, plan)
        if self._usage is not None:
            self._usage.record(_embed_usage(caller, model, plan, response, texts, started))
        return response

    async def _embed(self, texts: list[str], mode: mesh_pb2.CacheMode.ValueType,
                     plan: RequestPlan) -> mesh_pb2.EmbedResponse:
        """Cached vectors per text; only the misses go to Triton, and are stored afterwards."""
        metadata = plan.metadata
        vectors: list[list[float] | None] = [None] * len(texts)
        cache = None if mode == mesh_pb2.CACHE_MODE_BYPASS else self._cache
        if cache is None:
            metadata.cache_status = mesh_pb2.CACHE_STATUS_DISABLED if self._cache is None \
                else mesh_pb2.CACHE_STATUS_BYPASS
        elif mode == mesh_pb2.CACHE_MODE_REFRESH:
            metadata.cache_status = mesh_pb2.CACHE_STATUS_MISS
        else:
            found = await cache.get_embeddings(plan.cache_scope, texts)
            if found is None:
                metadata.cache_status = mesh_pb2.CACHE_STATUS_UNAVAILABLE
                metadata.degraded.append("cache")
            else:
                vectors = [None if v is None else v.tolist() for v in found]
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            # What the model read, for the usage record (as a generation's prompt tokens).
            plan.delivered.prompt_tokens = input_tokens(texts[i] for i in missing)
            rows = (await embed_texts(self._router, plan, [texts[i] for i in missing])).tolist()
            if self._budgets is not None:
                # Like a cache hit for a generation, a cached vector used no model time: only misses are charged.
                self._budgets.charge(plan.caller, input_tokens(texts[i] for i in missing))
            for row, index in enumerate(missing):
                vectors[index] = rows[row]
            if cache is not None and metadata.cache_status != mesh_pb2.CACHE_STATUS_UNAVAILABLE:
                metadata.cache_status = mesh_pb2.CACHE_STATUS_MISS
                cache.put_embeddings(cache_pb2.PutEmbeddingsRequest(
                    scope=plan.cache_scope, texts=[texts[i] for i in missing],
                    embeddings=[mesh_pb2.Embedding(values=row) for row in rows]))
        else:
            metadata.cache_status = mesh_pb2.CACHE_STATUS_EXACT_HIT
            metadata.model_version = plan.model.version
        response = mesh_pb2.EmbedResponse(dimension=plan.model.dimension, cached=len(texts) - len(missing),
                                          metadata=metadata)
        for vector in vectors:
            response.embeddings.add().values.extend(vector)
        return response

    async def upsert(self, caller: Caller, batches: AsyncIterator[retrieval_pb2.UpsertDocumentsRequest],
                     remaining_s: float | None) -> retrieval_pb2.UpsertDocumentsResponse:
        """Ingest, metered: each batch's text is embedded, so it is charged like Embed (the rate limit counts a
        whole stream as one request). A tier's storage quota travels with each batch to the retrieval service."""
        if self._budgets is not None:
            await self._budgets.admit(caller)
        relayed: list[int] = []

        async def counted() -> AsyncIterator[retrieval_pb2.UpsertDocumentsRequest]:
            async for batch in batches:
                relayed.append(input_tokens(d.text for d in batch.documents))
                yield batch
        try:
            return await self.documents.upsert(caller, counted(), within(self.settings.ingest_timeout_s, remaining_s))
        except MeshError:
            # The batch being read when it failed was refused or lost; the ones before it were stored.
            del relayed[-1:]
            raise
        finally:
            if self._budgets is not None:
                self._budgets.charge(caller, sum(relayed))

    async def delete_documents(self, caller: Caller, request: retrieval_pb2.DeleteDocumentsRequest,
                               remaining_s: float | None) -> retrieval_pb2.DeleteDocumentsResponse:
        return await self.documents.delete(caller, request, within(self.settings.delete_timeout_s, remaining_s))

    async def search(self, caller: Caller, request: retrieval_pb2.SearchRequest,
                     remaining_s: float | None) -> retrieval_pb2.SearchResponse:
        return await self.documents.search(caller, request, within(self.settings.search_timeout_s, remaining_s))

    async def collection_stats(self, caller: Caller,
                               remaining_s: float | None) -> retrieval_pb2.CollectionStatsResponse:
        return await self.documents.stats(caller, within(self.settings.search_timeout_s, remaining_s))

    async def ask(self, caller: Caller, request: mesh_pb2.AskRequest, remaining_s: float | None) -> Generation:
        """Search the caller's documents, answer from them, cite the chunks; retrieval down → no context."""
        settings = self.settings
        record = GenerationLog("ask", caller.tenant, request.model, settings.log_prompts, caller.key_id, self._usage)
        limits = settings.limits
        try:
            # Before anything uses it: the "documents do not answer" reply echoes it in a header.
            check_request_id(request.request_id, limits)
            model = await self.model(caller, request.model, models_pb2.MODEL_KIND_GENERATE)
            if not request.question.strip():
                raise invalid("question is empty")
            if len(request.question) > limits.max_question_chars:
                raise invalid(f"question is {len(request.question)} characters; the limit is "
                              f"{limits.max_question_chars}")
            top_k = request.top_k or settings.ask_default_top_k
            if not 1 <= top_k <= settings.ask_default_top_k:
                raise invalid(f"top_k must be within 1..{settings.ask_default_top_k}, got {top_k}")
            max_tokens = request.max_tokens or min(settings.ask_default_max_tokens, model.max_output_tokens)
            plan = plan_request(caller, model, request.request_id, within(settings.generate_timeout_s, remaining_s),
                                priority=request.priority)
            hits = []
            try:
                search = retrieval_pb2.SearchRequest(query=request.question, top_k=top_k, filter=request.filter,
                                                     mode=request.mode)
                if request.HasField("where"):
                    search.where.CopyFrom(request.where)
                found = await self.documents.search(caller, search, within(settings.search_timeout_s, remaining_s))
                hits = list(found.hits)
            except MeshError as exc:
                if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                plan.metadata.degraded.append("retrieval")
                log.warning("ask without context", extra={"tenant": caller.tenant, "error": exc.message})
            if "retrieval" not in plan.metadata.degraded and not rag.relevant(hits, settings.ask_min_similarity):
                plan.metadata.documents_do_not_answer = True
                chunks = rag.not_answered(hits, plan.metadata)
                return Generation(plan.metadata, _logged(_listed(chunks), record))
            generate, citations = rag.build_request(request, hits, settings.ask_max_context_chars, max_tokens)
            plan = dataclasses.replace(plan, cost=estimated_cost(generate))
            record.model_info, record.delivered, record.discount = model, plan.delivered, plan.discount
            record.prompt = prompt_text(generate) if settings.log_prompts else ""
            check_generate(generate, model, limits)
            chunks = _cited(await self._generate(generate, plan), citations)
            return Generation(plan.metadata, _logged(chunks, record))
        except MeshError as exc:
            record.failed(exc)
            record.write()
            raise

    async def report_wrong_cache_hit(self, caller: Caller, report: mesh_pb2.ReportWrongCacheHitRequest,
                                     remaining_s: float | None) -> mesh_pb2.ReportWrongCacheHitResponse:
        """The entry named stops answering this question (in this tenant's scope: the cache checks that the
        entry is the caller's own tenant's)."""
        if self._cache is None:
            raise unavailable("this deployment runs without a cache: there is no cached answer to report")
        if not report.cache_entry:
            raise invalid("cache_entry is required: the ResponseMetadata.cache_entry of the wrong answer")
        request, group = await self._cascade(report.request)
        model = await self.model(caller, request.model, models_pb2.MODEL_KIND_GENERATE)
        check_generate(request, model, self.settings.limits)
        plan = plan_request(caller, model, request.request_id, within(self.settings.metadata_timeout_s, remaining_s),
                            session=request.session_id, group=group)
        reply = await self._cache.report_wrong_hit(cache_pb2.ReportWrongHitRequest(
            scope=plan.cache_scope, request=request, semantic_entry=report.cache_entry), plan.timeout_s)
        return mesh_pb2.ReportWrongCacheHitResponse(recorded=reply.recorded)

    async def output_limit(self, name: str) -> int:
        """The most tokens a generation by `name` may ask for (a group: the least of its members'); 0 when
        unknown, which validation then reports."""
        model = await self.catalog.get(name)
        group = self.catalog.group(name)
        members = [await self.catalog.get(group.small), await self.catalog.get(group.large)] if group else [model]
        limits = [m.max_output_tokens for m in members if m is not None]
        return min(limits) if limits else 0

    async def models(self) -> list[models_pb2.ModelInfo]:
        if not self.catalog.loaded and not await self.catalog.refresh():
            raise unavailable("router unavailable: the model list cannot be read")
        return sorted(self.catalog.all(), key=lambda m: m.name)
