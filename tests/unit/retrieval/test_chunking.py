"""Issue 19's pure parts: structure-aware chunks, the BM25 terms, rank fusion, Ask's floor, the evaluation set."""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import pytest

from inference_mesh.v1 import mesh_pb2, retrieval_pb2
from services.gateway import rag
from services.retrieval.chunking import Chunker
from services.retrieval.fusion import cosine, reciprocal_rank_fusion
from services.retrieval.index import DocumentIndex
from services.retrieval.lexical import lexical_text, terms, unglue
from tests.unit.fakes import word_tokenizer_file

ROOT = Path(__file__).resolve().parents[3]
EVAL = ROOT / "data" / "retrieval-eval"
# Word-level tokens (tests/unit/fakes.py): the structure tests need offsets, not MiniLM's vocabulary; the real
# tokenizer is exercised wherever the retrieval service runs (tests/integration).
_SCRATCH = Path(tempfile.gettempdir()) / "mesh-unit-tests"
_SCRATCH.mkdir(exist_ok=True)
TOKENIZER = word_tokenizer_file(_SCRATCH)


def chunker(size: int = 512, overlap: int = 128) -> Chunker:
    return Chunker(TOKENIZER, size, overlap)


def test_markdown_sections_keep_their_heading_path_and_tables_stay_whole():
    text = ("# Guide\n\nIntro paragraph.\n\n## Limits\n\n| Tier | Burst |\n|---|---|\n| standard | 40 |\n"
            "| enterprise | 50 |\n\n### Notes\n\nBursts refill each second.\n\n## Tracing\n\nSpans go to OTLP.\n")
    chunks = chunker().split(text)
    assert [c.heading_path for c in chunks] == ["Guide", "Guide > Limits", "Guide > Limits > Notes",
                                                "Guide > Tracing"]
    limits = chunks[1]
    assert limits.text == "Guide > Limits\n| Tier | Burst |\n|---|---|\n| standard | 40 |\n| enterprise | 50 |"
    assert [c.index for c in chunks] == [0, 1, 2, 3]


def test_plain_text_titles_and_a_question_above_a_table():
    text = ("Architecture Overview:\nA pipeline needs an entry point, a cache and a vector store.\n"
            "Cache Layer\nPositioned near the entry point to intercept requests early.\n"
            "How do you pick a cache?\n| Approach | Best for |\n|---|---|\n| Exact | deterministic prompts |\n")
    chunks = chunker().split(text)
    assert [c.heading_path for c in chunks] == ["Architecture Overview", "Cache Layer", "How do you pick a cache?"]
    assert chunks[2].text.endswith("| Exact | deterministic prompts |")


def test_code_comments_and_fenced_blocks_are_not_headings():
    text = "# Real title\n\nrequirements.py\n# a comment inside code\nvalue = 1\n\n```\n# not a heading\n\nx\n```\n"
    assert {c.heading_path for c in chunker().split(text)} == {"Real title"}


def test_long_sections_split_at_sentences_with_overlap_and_cover_everything():
    sentences = [f"Sentence number {i} talks about lighthouse keepers and their lamps." for i in range(80)]
    chunks = chunker(64, 16).split("## History\n\n" + " ".join(sentences))
    assert len(chunks) > 5
    for chunk in chunks:
        body = chunk.text.split("\n", 1)[1]
        assert body.startswith("Sentence number") and body.endswith("lamps."), "cut at sentence boundaries"
        assert chunk.text.startswith("History\n")
    for first, second in itertools.pairwise(chunks):
        assert first.text.rsplit(". ", 1)[-1] in second.text, "the next chunk repeats the last sentence"
    joined = " ".join(c.text for c in chunks)
    assert all(sentence in joined for sentence in sentences)


def test_a_sentence_longer_than_a_chunk_falls_back_to_token_windows():
    text = " ".join(f"word{i}" for i in range(300))
    chunks = chunker(32, 8).split(text)
    assert chunks[0].text.startswith("word0") and chunks[-1].text.endswith("word299")
    assert chunker().split("   \n\n ") == []
    with pytest.raises(ValueError):
        Chunker(TOKENIZER, 8, 8)


def test_passages_search_a_chunk_in_pieces_and_unglue_flattened_fields():
    fields = " ".join(f"Setting{i}: value number {i} for the platform" for i in range(40)).replace(" Setting",
                                                                                                  "Setting")
    [chunk] = Chunker(TOKENIZER, 512, 128, passage_size=64).split("Config\nThe settings follow.\n" + fields)
    assert len(chunk.passages) > 3 and "platformSetting1:" in chunk.text, "the chunk is returned as written"
    assert all(p.startswith("Config\n") for p in chunk.passages), "every passage keeps the heading path"
    assert "platform Setting1:" in " ".join(chunk.passages), "glued words come apart for search"
    assert unglue("cachingTTL: 5 minutes, maxTokens") == "caching TTL: 5 minutes, max Tokens"
    [whole] = Chunker(TOKENIZER, 512, 128).split("Short\nA short section.")
    assert whole.passages == (whole.text,)
    hits = [{"chunk_id": "a#0", "score": 0.9}, {"chunk_id": "a#1", "score": 0.8}, {"chunk_id": "a#0", "score": 0.7}]
    assert [h["score"] for h in DocumentIndex._distinct(hits, 5)] == [0.9, 0.8]
    assert len(DocumentIndex._distinct(hits, 1)) == 1


def test_bm25_terms_are_stemmed_without_stop_words():
    assert terms("How many failures trigger the Circuit Breaker?") == ["failur", "trigger", "circuit", "breaker"]
    assert lexical_text("Circuit Breaker: 10 failures to trigger") == "circuit breaker 10 failur trigger"
    assert lexical_text("the of and") == ""


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "d"]], k=60, weights=[1.0, 1.0])
    assert [key for key, _ in fused] == ["c", "a", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 63 + 1 / 61)
    dense_only = reciprocal_rank_fusion([["a", "b"], ["b", "a"]], k=60, weights=[1.0, 0.0])
    assert [key for key, _ in dense_only] == ["a", "b"]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], k=60, weights=[1.0, 1.0])
    assert cosine([1.0, 0.0], [[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]) == [1.0, 0.0, 0.0]


def test_ask_floor_refuses_only_when_nothing_is_close():
    close = retrieval_pb2.SearchHit(chunk_id="d#0", document_id="d", similarity=0.6, heading_path="A > B")
    far = retrieval_pb2.SearchHit(chunk_id="d#1", document_id="d", similarity=0.1)
    lexical = retrieval_pb2.SearchHit(chunk_id="d#2", document_id="d", similarity=0.0)
    assert rag.relevant([far, close], 0.25) and not rag.relevant([far], 0.25) and not rag.relevant([], 0.25)
    assert rag.relevant([lexical], 0.25), "a BM25-only search has no similarity to judge by"
    metadata = mesh_pb2.ResponseMetadata()
    [reply] = rag.not_answered([far], metadata)
    assert "do not answer" in reply.text and reply.finish_reason == mesh_pb2.FINISH_REASON_STOP
    assert [c.chunk_id for c in reply.metadata.citations] == ["d#1"]
    _, citations = rag.build_request(mesh_pb2.AskRequest(model="m", question="q"), [close], 4000, 16)
    assert citations[0].heading_path == "A > B" and citations[0].similarity == pytest.approx(0.6)


def test_the_evaluation_set_is_sound():
    """At least 150 answerable questions, each answer a passage of its document, ids unique."""
    rows = [json.loads(line) for line in (EVAL / "questions.jsonl").read_text().splitlines() if line.strip()]
    answerable = [r for r in rows if r["document"]]
    assert len(answerable) >= 150 and len(rows) - len(answerable) >= 20
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"] for r in rows}) == len(rows)
    for row in answerable:
        assert row["answer"] in (EVAL / "documents" / row["document"]).read_text(), row["id"]


def test_ask_reads_the_part_of_each_chunk_nearest_the_question():
    filler = " ".join(f"Line {i} says something about lighthouses and keepers." for i in range(60))
    long_chunk = f"Config > Gateway\n{filler} Circuit Breaker: 10 failures to triggerRecovery Time: 60 seconds."
    cut = rag.excerpt(long_chunk, "How many failures trigger the circuit breaker?", 500)
    assert len(cut) <= 500 and cut.startswith("Config > Gateway\n") and "10 failures to trigger" in cut
    assert rag.excerpt("short text", "anything", 500) == "short text"
    hits = [retrieval_pb2.SearchHit(chunk_id=f"d#{i}", document_id="d", text=long_chunk, similarity=0.5)
            for i in range(5)]
    request, citations = rag.build_request(mesh_pb2.AskRequest(model="m", question="circuit breaker failures"),
                                           hits, 3000, 16)
    assert len(citations) == 5, "five long chunks share the context instead of two filling it"
    assert request.messages[0].content.count("10 failures to trigger") == 5
