"""Retrieval on Milvus (HNSW) and Ask (RAG with citations), through the gateway, per tenant."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import yaml

from inference_mesh.v1 import mesh_pb2, retrieval_pb2
from tests.conftest import AUTH, EMBEDDER, KEYS, LLM
from tools.stack import ROOT, SERVICE_ENV

AUTH_B = (("x-api-key", KEYS["tenant-b"]),)
VOLCANO = ("Volcanoes form where magma from the mantle reaches the surface. Eruptions release lava, ash and gases. "
           "Shield volcanoes such as Mauna Loa have gentle slopes built by fluid basalt lava flows.")
BREAD = ("Sourdough bread rises because wild yeast and lactic acid bacteria in the starter ferment the flour. "
         "The yeast produces carbon dioxide, which is trapped by gluten and makes the dough rise before baking.")
TCP = ("TCP congestion control adjusts the sending rate: slow start doubles the congestion window every round "
       "trip until loss is detected, then congestion avoidance grows it linearly.")


def doc(doc_id: str, text: str, **metadata: str) -> retrieval_pb2.Document:
    return retrieval_pb2.Document(id=doc_id, text=text, metadata=metadata)


def upsert(mesh, documents, metadata=AUTH) -> retrieval_pb2.UpsertDocumentsResponse:
    return mesh.UpsertDocuments(iter([retrieval_pb2.UpsertDocumentsRequest(documents=documents)]),
                                metadata=metadata, timeout=120)


def search(mesh, query: str, metadata=AUTH, **kwargs) -> list[retrieval_pb2.SearchHit]:
    kwargs.setdefault("top_k", 3)
    return list(mesh.Search(retrieval_pb2.SearchRequest(query=query, **kwargs), metadata=metadata, timeout=30).hits)


def stats(mesh, metadata=AUTH) -> int:
    return mesh.CollectionStats(retrieval_pb2.CollectionStatsRequest(), metadata=metadata, timeout=30).chunks


@pytest.fixture(scope="module")
def corpus(mesh):
    long_text = " ".join(f"Paragraph {i} is about the history of lighthouses and their keepers." for i in range(120))
    answer = upsert(mesh, [doc("geo/volcano", VOLCANO, lang="en", topic="geology"),
                           doc("food/bread", BREAD, lang="en", topic="food"),
                           doc("net/tcp", TCP, lang="fr", topic="networks"),
                           doc("long/lighthouses", long_text, lang="en", topic="history")])
    assert answer.documents == 4
    assert answer.chunks > 4, "the long document is split into several chunks"
    return answer


def test_search_finds_the_right_chunk(mesh, corpus):
    hits = search(mesh, "How does bread dough rise?")
    assert hits[0].document_id == "food/bread"
    assert hits[0].chunk_id == "food/bread#0" and "wild yeast" in hits[0].text
    assert hits[0].metadata["topic"] == "food"
    assert hits[0].score > hits[-1].score
    assert search(mesh, "what happens when magma reaches the surface")[0].document_id == "geo/volcano"


def test_the_index_takes_its_vector_size_from_the_registry(mesh, corpus):
    registry = yaml.safe_load((ROOT / "config" / "registry.yaml").read_text())
    answer = mesh.CollectionStats(retrieval_pb2.CollectionStatsRequest(), metadata=AUTH, timeout=30)
    assert answer.dimension == registry["models"][EMBEDDER]["dimension"] == 384
    lexical = " + BM25 (SPARSE_INVERTED_INDEX)" if has_bm25(mesh) else ""
    assert answer.index == "HNSW(M=16, efConstruction=200), COSINE" + lexical

def test_long_document_chunks_overlap_and_cover_the_text(mesh, corpus):
    hits = search(mesh, "lighthouse keepers history", top_k=50, filter='metadata["topic"] == "history"')
    chunks = sorted(hits, key=lambda h: int(h.chunk_id.split("#")[1]))
    assert len(chunks) >= 2 and all(h.document_id == "long/lighthouses" for h in chunks)
    assert "Paragraph 0 " in chunks[0].text and "Paragraph 119 " in chunks[-1].text
    tail_of_first = chunks[0].text[-60:]
    assert tail_of_first in chunks[1].text, "consecutive chunks overlap"


def test_upserting_again_replaces_and_never_duplicates(mesh, corpus):
    before = stats(mesh)
    again = upsert(mesh, [doc("food/bread", BREAD, lang="en", topic="food")])
    assert again.chunks == 1
    assert stats(mesh) == before
    changed = upsert(mesh, [doc("food/bread", BREAD + " Rye flour ferments faster.", lang="en", topic="food")])
    assert changed.chunks == 1 and stats(mesh) == before
    hits = search(mesh, "rye flour fermentation", top_k=10)
    assert [h.document_id for h in hits].count("food/bread") == 1
    assert "Rye flour" in hits[0].text


def test_delete_removes_the_document(mesh, corpus):
    upsert(mesh, [doc("tmp/deleteme", "Quantum knitting is the art of weaving yarn in superposition.")])
    assert search(mesh, "quantum knitting yarn")[0].document_id == "tmp/deleteme"
    before = stats(mesh)
    deleted = mesh.DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(ids=["tmp/deleteme"]), metadata=AUTH,
                                   timeout=30)
    assert deleted.chunks_deleted == 1
    assert stats(mesh) == before - 1
    assert all(h.document_id != "tmp/deleteme" for h in search(mesh, "quantum knitting yarn", top_k=10))


def test_filter_expressions(mesh, corpus):
    french = search(mesh, "how does something grow", top_k=10, filter='metadata["lang"] == "fr"')
    assert [h.document_id for h in french] == ["net/tcp"]
    some = search(mesh, "science", top_k=10, filter='metadata["topic"] in ["geology", "food"] and '
                                                    'not (metadata["lang"] == "fr")')
    assert {h.document_id for h in some} == {"geo/volcano", "food/bread"}


def test_tenants_are_isolated(mesh, corpus):
    assert stats(mesh, AUTH_B) == 0
    assert search(mesh, "How does bread dough rise?", metadata=AUTH_B, top_k=10) == []
    # Same document id in tenant B: its own document, A's is untouched.
    upsert(mesh, [doc("food/bread", "Tenant B's bread notes: use a hot oven.")], metadata=AUTH_B)
    assert search(mesh, "How does bread dough rise?", metadata=AUTH_B, top_k=10)[0].text.startswith("Tenant B")
    assert "wild yeast" in search(mesh, "How does bread dough rise?")[0].text
    gone = mesh.DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(ids=["geo/volcano"]), metadata=AUTH_B,
                                timeout=30)
    assert gone.chunks_deleted == 0
    assert search(mesh, "magma eruption")[0].document_id == "geo/volcano"
    # Filters cannot step outside the tenant clause.
    for escape in ('metadata["lang"] == "en") or (tenant != "x"', 'tenant == "tenant-a"',
                   'metadata["lang"] == "en" or true) or (true', 'document_id != ""'):
        with pytest.raises(grpc.RpcError) as info:
            search(mesh, "bread", metadata=AUTH_B, filter=escape)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, escape


@pytest.mark.parametrize(("name", "call", "message"), [
    ("empty text", lambda m: upsert(m, [doc("x/empty", "   ")]), "has no text"),
    ("10 MB document", lambda m: upsert(m, [doc("x/huge", "a" * 10_000_000)]), "the limit is 1000000"),
    ("bad id", lambda m: upsert(m, [doc("bad id with spaces", "text")]), "id must be"),
    ("top_k 0", lambda m: search(m, "q", top_k=0), "top_k must be within 1..100"),
    ("top_k 10000", lambda m: search(m, "q", top_k=10_000), "got 10000"),
    ("malformed filter", lambda m: search(m, "q", filter='metadata["lang"] == '), "filter"),
    ("filter with a bad token", lambda m: search(m, "q", filter="1; drop collection"), "unexpected input"),
    ("unbalanced filter", lambda m: search(m, "q", filter='(metadata["a"] == "b"'), "unbalanced"),
    ("vector of the wrong dimension",
     lambda m: m.Search(retrieval_pb2.SearchRequest(vector=[0.1] * 10, top_k=3), metadata=AUTH, timeout=30),
     "dimension 10; the index uses 384"),
    ("text and vector", lambda m: m.Search(retrieval_pb2.SearchRequest(query="q", vector=[0.1] * 384, top_k=3),
                                           metadata=AUTH, timeout=30), "either query"),
])
def test_bad_input(mesh, corpus, name, call, message):
    with pytest.raises(grpc.RpcError) as info:
        call(mesh)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()


def test_search_by_vector(mesh, corpus):
    vector = mesh.Embed(mesh_pb2.EmbedRequest(model="all-minilm-l6-v2", texts=["bread dough rising yeast"]),
                        metadata=AUTH, timeout=30).embeddings[0].values
    hits = mesh.Search(retrieval_pb2.SearchRequest(vector=vector, top_k=1), metadata=AUTH, timeout=30).hits
    assert hits[0].document_id == "food/bread"


def ask(mesh, question: str, metadata=AUTH, **kwargs) -> list[mesh_pb2.GenerateChunk]:
    return list(mesh.Ask(mesh_pb2.AskRequest(model=LLM, question=question, max_tokens=24, temperature=0.0,
                                             **kwargs), metadata=metadata, timeout=120))


def test_ask_answers_with_citations(mesh, corpus):
    chunks = ask(mesh, "Why does sourdough bread rise?", top_k=2)
    last = chunks[-1]
    assert last.finish_reason in (mesh_pb2.FINISH_REASON_STOP, mesh_pb2.FINISH_REASON_LENGTH)
    assert "".join(c.text for c in chunks).strip()
    cited = [c.document_id for c in last.metadata.citations]
    assert cited[0] == "food/bread" and len(cited) == 2
    assert "retrieval" not in last.metadata.degraded
    # The context made it into the prompt: far more prompt tokens than the question alone.
    assert last.usage.prompt_tokens > 100
    with pytest.raises(grpc.RpcError) as info:
        ask(mesh, "Why?", top_k=6)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def has_bm25(mesh) -> bool:
    """milvus-lite has BM25; the Milvus 2.3 standalone of the milvus_server tests does not (dense only there)."""
    index = mesh.CollectionStats(retrieval_pb2.CollectionStatsRequest(), metadata=AUTH, timeout=30).index
    return "BM25" in index


SEED_CONFIG = (ROOT / "data" / "retrieval-eval" / "documents" / "000_68831e299f720953.txt").read_text()
BREAKER_PROSE = ("Circuit breakers protect a service from a failing dependency. When a breaker opens, calls fail fast "
                 "instead of waiting; after a while the breaker lets one call through to test the dependency. "
                 "Breakers are a failure-handling pattern, like retries with backoff and timeouts.")
LIMITS_GUIDE = """# Operations guide

## Request limits

| Tier | Requests per minute | Burst |
|---|---|---|
| standard | 300 | 40 |
| enterprise | 1000 | 50 |

## Tracing

Spans are exported over OTLP to the collector.
"""


@pytest.fixture(scope="module")
def structured(mesh):
    upsert(mesh, [doc("seed/config", SEED_CONFIG), doc("prose/breakers", BREAKER_PROSE),
                  doc("ops/guide", LIMITS_GUIDE)])


def test_hybrid_finds_the_config_card_that_dense_ranks_below_prose(mesh, structured):
    """The question of issue 19: the chunk that says "Circuit Breaker: 10 failures to trigger" is cited."""
    question = "How many failures trigger the circuit breaker?"
    if not has_bm25(mesh):
        with pytest.raises(grpc.RpcError) as info:
            search(mesh, question, mode=retrieval_pb2.SEARCH_MODE_HYBRID)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs BM25" in info.value.details()
        return
    response = mesh.Search(retrieval_pb2.SearchRequest(query=question, top_k=3), metadata=AUTH, timeout=30)
    assert response.mode == retrieval_pb2.SEARCH_MODE_HYBRID, "hybrid is the default"
    assert any("10 failures to trigger" in hit.text for hit in response.hits), [h.text[:80] for h in response.hits]
    assert all(0 < hit.similarity <= 1 for hit in response.hits), "every fused hit says how similar it is"
    lexical = search(mesh, question, mode=retrieval_pb2.SEARCH_MODE_SPARSE)
    assert any("10 failures to trigger" in hit.text for hit in lexical)
    assert all(hit.similarity == 0 for hit in lexical), "a sparse search embeds nothing"
    answer = ask(mesh, question, top_k=3)[-1].metadata
    assert not answer.documents_do_not_answer
    assert any(c.document_id == "seed/config" for c in answer.citations)


def test_chunks_keep_their_heading_path(mesh, structured):
    hits = search(mesh, "enterprise burst requests per minute", top_k=1,
                  mode=retrieval_pb2.SEARCH_MODE_DENSE, filter="")
    assert hits[0].document_id == "ops/guide"
    assert hits[0].heading_path == "Operations guide > Request limits"
    assert hits[0].text.startswith("Operations guide > Request limits\n| Tier |"), "the table stays with its title"
    assert "Spans are exported" not in hits[0].text, "another section is another chunk"
    cited = ask(mesh, "What is the burst limit of the enterprise tier?", top_k=1)[-1].metadata.citations
    assert cited[0].heading_path == "Operations guide > Request limits" and cited[0].similarity > 0


def test_ask_says_when_the_documents_do_not_answer(mesh, structured):
    chunks = ask(mesh, "Who painted the ceiling of the Sistine Chapel?", top_k=3)
    last = chunks[-1]
    assert last.metadata.documents_do_not_answer
    assert "do not answer" in "".join(c.text for c in chunks)
    assert len(last.metadata.citations) == 3, "the closest chunks are still cited"
    assert last.usage.prompt_tokens == 0, "no model was asked"


def test_modes_are_checked_and_stay_in_the_tenant(mesh, structured):
    vector = [0.1] * 384
    for mode in (retrieval_pb2.SEARCH_MODE_SPARSE, retrieval_pb2.SEARCH_MODE_HYBRID):
        with pytest.raises(grpc.RpcError) as info:
            mesh.Search(retrieval_pb2.SearchRequest(vector=vector, top_k=3, mode=mode), metadata=AUTH, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        search(mesh, "bread", mode=9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not one of" in info.value.details()
    if has_bm25(mesh):
        # Tenant b has no document with these words; tenant a's must not reach it through BM25.
        for mode in (retrieval_pb2.SEARCH_MODE_SPARSE, retrieval_pb2.SEARCH_MODE_HYBRID):
            hits = search(mesh, "circuit breaker failures trigger", metadata=AUTH_B, mode=mode, top_k=10)
            assert not any(h.document_id in ("seed/config", "prose/breakers", "ops/guide") for h in hits)


def test_bm25_scores_do_not_reveal_other_tenants_documents(mesh, structured):
    """BM25's term statistics span the collection: a tenant must not see another's ingest in its own scores."""
    if not has_bm25(mesh):
        return
    upsert(mesh, [doc("probe/own", "The zebrafish thrives in a quiet aquarium.")], metadata=AUTH_B)

    def probe():
        return [(h.chunk_id, h.score) for h in search(mesh, "zebrafish aquarium", metadata=AUTH_B,
                                                       mode=retrieval_pb2.SEARCH_MODE_SPARSE)]

    before = probe()
    upsert(mesh, [doc(f"probe/other{i}", f"Zebrafish note {i}: zebrafish, zebrafish everywhere.") for i in range(20)])
    assert probe() == before
    assert before[0] == ("probe/own#0", pytest.approx(1 / 61))


def test_ingest_command_line(stack, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "owls.md").write_text("# Owls\nOwls hunt at night and can turn their heads far.")
    (tmp_path / "tides.txt").write_text("Tides are caused mainly by the gravitational pull of the Moon.")
    (tmp_path / "ignored.pdf").write_text("not a text document")
    done = subprocess.run([sys.executable, "-m", "services.retrieval", "ingest", str(tmp_path),
                           *(["--edge", stack.edge_address, "--ca", str(stack.pki.ca_cert)] if stack.with_edge
                             else ["--edge", stack.gateway_address, "--plaintext"]),
                           "--api-key", KEYS["tenant-b"]],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**SERVICE_ENV, "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert "ingested 2 documents, 2 chunks in" in done.stdout
    assert "2/2 documents" in done.stderr  # the progress bar


def test_milvus_down_search_fails_fast_and_ask_degrades(mesh, stack, corpus):
    stack.processes["milvus"].kill()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            search(mesh, "bread")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3.0
        # Milvus's own words (its address, its exception) stay in the retrieval log.
        details = info.value.details()
        assert str(stack.ports.milvus) not in details and "Exception" not in details, details
        started = time.monotonic()
        chunks = ask(mesh, "Why does sourdough bread rise?")
        assert "retrieval" in chunks[-1].metadata.degraded and not chunks[-1].metadata.citations
        assert "".join(c.text for c in chunks).strip()
        assert time.monotonic() - started < 30
    finally:
        stack.start_milvus()
    deadline = time.monotonic() + 30
    while True:  # the retrieval service reconnects in the background
        try:
            assert search(mesh, "How does bread dough rise?")[0].document_id == "food/bread"
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "search did not recover after Milvus came back"
            time.sleep(0.5)
