"""The public InferenceMesh service: authenticate, validate, bound in time, then orchestrate."""

from __future__ import annotations

import logging

import grpc
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import cache_pb2, mesh_pb2, mesh_pb2_grpc, models_pb2, retrieval_pb2
from services.common.deadlines import downstream_timeout
from services.common.errors import MeshError, invalid
from services.common.model_catalog import ModelCatalog
from services.gateway import cached_generation, rag
from services.gateway.auth import Authenticator
from services.gateway.budgets import TokenBudgets, metered
from services.gateway.cache_client import CacheClient
from services.gateway.documents import DocumentsRelay
from services.gateway.embedding import embed_texts
from services.gateway.genai_metrics import observed
from services.gateway.plan import RequestPlan, plan_request
from services.gateway.request_log import GenerationLog, prompt_text
from services.gateway.routing_hints import affinity_key, group_member
from services.gateway.settings import GatewaySettings
from services.gateway.validation import check_embed, check_generate, check_model

log = logging.getLogger(__name__)


class InferenceMeshService(mesh_pb2_grpc.InferenceMeshServicer):
    def __init__(self, settings: GatewaySettings, auth: Authenticator, catalog: ModelCatalog,
                 router: service_pb2_grpc.GRPCInferenceServiceStub, cache: CacheClient | None,
                 documents: DocumentsRelay, budgets: TokenBudgets | None = None) -> None:
        self._settings = settings
        self._auth = auth
        self._catalog = catalog
        self._router = router
        self._cache = cache
        self._documents = documents
        self._budgets = budgets
        self._stream_retrier = settings.resilience.retrier("router-streams")

    async def _cascade(self, request: mesh_pb2.GenerateRequest) -> tuple[mesh_pb2.GenerateRequest, str]:
        """A request naming a model group, rewritten to the member the group's rule picks."""
        await self._catalog.get(request.model)
        group = self._catalog.group(request.model)
        if group is None:
            return request, ""
        chosen = mesh_pb2.GenerateRequest()
        chosen.CopyFrom(request)
        chosen.model = group_member(group, request)
        return chosen, group.name

    async def _model(self, name: str, kind: models_pb2.ModelKind.ValueType) -> models_pb2.ModelInfo:
        return check_model(name, await self._catalog.get(name), self._catalog.all(), kind)

    async def _generate(self, request: mesh_pb2.GenerateRequest, plan: RequestPlan):
        """The cached generation, admitted and charged against the tenant's token budget."""
        plan.metadata.model_version = plan.model.version
        chunks = cached_generation.generate(self._cache, self._router, request, plan, self._stream_retrier)
        chunks = observed(chunks, plan.caller.tenant, plan.model.name)
        if self._budgets is None:
            return chunks
        await self._budgets.admit(plan.caller)
        return metered(self._budgets, plan.caller, chunks)

    async def Generate(self, request, context):
        caller = await self._auth.require(context)
        record = GenerationLog("generate", caller.tenant, request.model, self._settings.log_prompts)
        try:
            request, group = await self._cascade(request)
            record.prompt = prompt_text(request) if self._settings.log_prompts else ""
            model = await self._model(request.model, models_pb2.MODEL_KIND_GENERATE)
            check_generate(request, model, self._settings.limits)
            plan = plan_request(caller, model, request.request_id,
                                downstream_timeout(context, self._settings.generate_timeout_s),
                                session=request.session_id, group=group,
                                affinity=affinity_key(request, self._settings.affinity_min_prefix_chars))
            async for chunk in await self._generate(request, plan):
                record.seen(chunk)
                yield chunk
        except MeshError as exc:
            record.fields["status"] = exc.code.name
            raise
        finally:
            record.write()

    async def Embed(self, request, context):
        caller = await self._auth.require(context)
        model = await self._model(request.model, models_pb2.MODEL_KIND_EMBED)
        check_embed(request, self._settings.limits)
        plan = plan_request(caller, model, request.request_id,
                            downstream_timeout(context, self._settings.embed_timeout_s))
        return await self._embed(list(request.texts), request.cache_mode, plan)

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
                vectors = [list(e.values) or None for e in found.embeddings]
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            rows = (await embed_texts(self._router, plan, [texts[i] for i in missing])).tolist()
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

    async def Ask(self, request, context):
        """Search the caller's documents, answer from them, cite the chunks; retrieval down → no context."""
        caller = await self._auth.require(context)
        record = GenerationLog("ask", caller.tenant, request.model, self._settings.log_prompts)
        limits = self._settings.limits
        try:
            model = await self._model(request.model, models_pb2.MODEL_KIND_GENERATE)
            if not request.question.strip():
                raise invalid("question is empty")
            if len(request.question) > limits.max_question_chars:
                raise invalid(f"question is {len(request.question)} characters; the limit is "
                              f"{limits.max_question_chars}")
            top_k = request.top_k or self._settings.ask_default_top_k
            if not 1 <= top_k <= self._settings.ask_default_top_k:
                raise invalid(f"top_k must be within 1..{self._settings.ask_default_top_k}, got {top_k}")
            max_tokens = request.max_tokens or min(self._settings.ask_default_max_tokens, model.max_output_tokens)
            plan = plan_request(caller, model, request.request_id,
                                downstream_timeout(context, self._settings.generate_timeout_s))
            hits = []
            try:
                search = retrieval_pb2.SearchRequest(query=request.question, top_k=top_k, filter=request.filter)
                if request.HasField("where"):
                    search.where.CopyFrom(request.where)
                found = await self._documents.search(
                    caller, search, downstream_timeout(context, self._settings.search_timeout_s))
                hits = list(found.hits)
            except MeshError as exc:
                if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                plan.metadata.degraded.append("retrieval")
                log.warning("ask without context", extra={"tenant": caller.tenant, "error": exc.message})
            generate, citations = rag.build_request(request, hits, self._settings.ask_max_context_chars, max_tokens)
            record.prompt = prompt_text(generate) if self._settings.log_prompts else ""
            check_generate(generate, model, limits)
            async for chunk in await self._generate(generate, plan):
                if chunk.finish_reason:
                    chunk.metadata.citations.extend(citations)
                record.seen(chunk)
                yield chunk
        except MeshError as exc:
            record.fields["status"] = exc.code.name
            raise
        finally:
            record.write()

    async def UpsertDocuments(self, request_iterator, context):
        caller = await self._auth.require(context)
        return await self._documents.upsert(caller, request_iterator,
                                            downstream_timeout(context, self._settings.ingest_timeout_s))

    async def DeleteDocuments(self, request, context):
        caller = await self._auth.require(context)
        return await self._documents.delete(caller, request,
                                            downstream_timeout(context, self._settings.delete_timeout_s))

    async def Search(self, request, context):
        caller = await self._auth.require(context)
        return await self._documents.search(caller, request,
                                            downstream_timeout(context, self._settings.search_timeout_s))

    async def CollectionStats(self, request, context):
        caller = await self._auth.require(context)
        return await self._documents.stats(caller, downstream_timeout(context, self._settings.search_timeout_s))

    async def ListModels(self, request, context):
        await self._auth.require(context)
        if not self._catalog.loaded and not await self._catalog.refresh():
            raise MeshError(grpc.StatusCode.UNAVAILABLE, "router unavailable: the model list cannot be read")
        return mesh_pb2.ListModelsResponse(models=sorted(self._catalog.all(), key=lambda m: m.name))
