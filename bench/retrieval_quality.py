"""Retrieval quality: recall@1/5/10 and MRR of dense, BM25 and hybrid search on documents the project did not
write, Ask's "documents do not answer" rate, and what hybrid search costs over dense.

The question set is data/retrieval-eval/questions.jsonl (docs/retrieval-eval.md says how it was written): each
answerable question names its document and a passage of it; a hit is correct when it is a chunk of that document
that contains the passage (whitespace ignored). The documents (data/retrieval-eval/documents) are ingested into
one tenant through the gateway with the retrieval service's defaults; every question is searched in every mode
through the gateway, so the numbers are what a caller gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from pymilvus import MilvusClient

from bench.inference_path import ROOT, pct, write_section
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, retrieval_pb2
from services.gateway.settings import GatewaySettings
from tools.stack import LocalStack, StackPorts

EVAL = ROOT / "data" / "retrieval-eval"
AUTH = (("x-api-key", "mesh-dev-key"),)
MODES = {"dense": retrieval_pb2.SEARCH_MODE_DENSE, "BM25": retrieval_pb2.SEARCH_MODE_SPARSE,
         "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID}
TOP_K = 10
COLLECTION = "mesh_documents"


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    document: str
    answer: str


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def load_questions(path: Path = EVAL / "questions.jsonl") -> list[Question]:
    return [Question(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def first_correct_rank(question: Question, hits) -> int | None:
    answer = squash(question.answer)
    for rank, hit in enumerate(hits, start=1):
        if hit.document_id == question.document and answer in squash(hit.text):
            return rank
    return None


def quality(ranks: list[int | None]) -> dict:
    count = len(ranks)
    return {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / count for k in (1, 5, 10)} | {
        "mrr": sum(1 / r for r in ranks if r is not None) / count}


async def ingest(mesh: mesh_pb2_grpc.InferenceMeshStub) -> retrieval_pb2.UpsertDocumentsResponse:
    request = retrieval_pb2.UpsertDocumentsRequest()
    for path in sorted((EVAL / "documents").glob("*.txt")):
        request.documents.add(id=path.name, text=path.read_text())

    async def batches():
        yield request

    return await mesh.UpsertDocuments(batches(), metadata=AUTH, timeout=600)


def settle(uri: str) -> None:
    """Steady state, as after any restart: segments sealed, indexed and loaded (freshly written rows are otherwise
    searched from growing segments, several times slower on milvus-lite)."""
    client = MilvusClient(uri=uri, timeout=120)
    client.flush(COLLECTION)
    client.release_collection(COLLECTION)
    client.load_collection(COLLECTION)
    client.close()


async def measure(stack: LocalStack, rounds: int) -> dict:
    questions = load_questions()
    answerable = [q for q in questions if q.document]
    unanswerable = [q for q in questions if not q.document]
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        ingested = await ingest(mesh)
        await asyncio.to_thread(settle, f"http://127.0.0.1:{stack.ports.milvus}")

        async def search(question: str, mode: int) -> tuple[float, list]:
            started = time.perf_counter()
            response = await mesh.Search(retrieval_pb2.SearchRequest(query=question, top_k=TOP_K, mode=mode),
                                         metadata=AUTH, timeout=30)
            return time.perf_counter() - started, list(response.hits)

        for question in answerable[:20]:  # warm-up: connections, caches of the tokenizer and the stemmer
            for mode in MODES.values():
                await search(question.question, mode)
        ranks: dict[str, list[int | None]] = {name: [] for name in MODES}
        latency_ms: dict[str, list[float]] = {name: [] for name in MODES}
        listed: dict[str, dict[str, list]] = {name: {} for name in MODES}
        top_similarity: dict[str, list[float]] = {"answerable": [], "unanswerable": []}
        for round_index in range(rounds):
            for question in questions:
                # Modes alternate per question, so a slow moment of the machine does not land on one mode.
                for name, mode in MODES.items():
                    seconds, hits = await search(question.question, mode)
                    latency_ms[name].append(seconds * 1000)
                    if round_index == 0 and question.document:
                        ranks[name].append(first_correct_rank(question, hits))
                        listed[name][question.id] = [
                            (hit.chunk_id, first_correct_rank(question, [hit]) is not None) for hit in hits]
                    if round_index == 0 and name == "hybrid":
                        group = "answerable" if question.document else "unanswerable"
                        top_similarity[group].append(max((h.similarity for h in hits[:5]), default=0.0))
        asked = []
        for question in unanswerable:
            chunks = [c async for c in mesh.Ask(mesh_pb2.AskRequest(
                model="smollm2-135m-instruct", question=question.question, top_k=5, max_tokens=16, temperature=0.0),
                metadata=AUTH, timeout=120)]
            asked.append(chunks[-1].metadata.documents_do_not_answer)
    return {"questions": len(questions), "answerable": len(answerable), "unanswerable": len(unanswerable),
            "documents": ingested.documents, "chunks": ingested.chunks,
            "quality": {name: quality(r) for name, r in ranks.items()},
            "latency": {name: {"p50": pct(v, 50), "p99": pct(v, 99), "mean": statistics.fmean(v)}
                        for name, v in latency_ms.items()},
            "ranks": {name: dict(zip([q.id for q in answerable], r, strict=True)) for name, r in ranks.items()},
            "hits": listed, "samples": len(latency_ms["dense"]), "top_similarity": top_similarity,
            "ask_not_answered": asked}


def render(result: dict, floor: float) -> str:
    q, lat = result["quality"], result["latency"]
    lines = [f"Command: `python -m bench.retrieval_quality` (in `make bench`). {result['documents']} documents "
             f"(data/retrieval-eval/documents, the seed documents; none written by this project) ingested as "
             f"{result['chunks']} chunks with the retrieval defaults (structure-aware, 512 tokens, 128 overlap) on "
             f"milvus-lite; {result['answerable']} answerable questions and {result['unanswerable']} with no answer "
             "in the documents (data/retrieval-eval/questions.jsonl, method in docs/retrieval-eval.md). Every "
             f"search through the gateway, top_k {TOP_K}.", "",
             "| mode | recall@1 | recall@5 | recall@10 | MRR@10 | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in MODES:
        lines.append(f"| {name} | {q[name]['recall@1']:.3f} | {q[name]['recall@5']:.3f} | {q[name]['recall@10']:.3f} "
                     f"| {q[name]['mrr']:.3f} | {lat[name]['p50']:.2f} | {lat[name]['p99']:.2f} |")
    gain = q["hybrid"]["recall@5"] - q["dense"]["recall@5"]
    added = lat["hybrid"]["p50"] - lat["dense"]["p50"]
    met_recall = q["hybrid"]["recall@5"] >= 0.90 and gain >= 0.10
    lines += ["", f"Hybrid recall@5 {q['hybrid']['recall@5']:.3f}, {gain * 100:+.1f} points over dense (target ≥ 0.90 "
              f"and ≥ +10: {'met' if met_recall else 'missed'}); hybrid adds {added:+.2f} ms p50 over dense on the "
              f"same collection (target ≤ 5 ms: {'met' if added <= 5 else 'missed'}; latency over "
              f"{result['samples']} searches per mode, modes interleaved).", ""]
    answerable = result["top_similarity"]["answerable"]
    unanswerable = result["top_similarity"]["unanswerable"]
    not_answered = result["ask_not_answered"]
    lines += [f"Ask's relevance floor (gateway `ask_min_similarity` = {floor}): on the {len(not_answered)} questions "
              f"with no answer, Ask said the documents do not answer **{sum(not_answered)} times "
              f"({sum(not_answered) / len(not_answered):.0%})**. By floor, the share of questions below it (best "
              "cosine similarity among the top 5 hybrid hits):", "",
              "| floor | answerable refused | unanswerable refused |", "|---:|---:|---:|"]
    for candidate in (0.15, 0.20, 0.25, 0.30, 0.35, 0.40):
        refused = sum(1 for s in answerable if s < candidate) / len(answerable)
        caught = sum(1 for s in unanswerable if s < candidate) / len(unanswerable)
        lines.append(f"| {candidate:.2f}{' (default)' if abs(candidate - floor) < 1e-9 else ''} | {refused:.1%} | "
                     f"{caught:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="searches of every question per mode, for latency")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--env", nargs="*", default=[], metavar="K=V",
                        help="retrieval settings to try, e.g. MESH_RETRIEVAL_CHUNK_TOKENS=256 (implies --no-write)")
    args = parser.parse_args()
    retrieval_env = dict(item.split("=", 1) for item in args.env)
    run_dir = ROOT / "build" / "bench-retrieval-quality"
    # A new collection each run: one left by an earlier run keeps the schema (and chunks) it was made with.
    shutil.rmtree(run_dir, ignore_errors=True)
    stack = LocalStack(run_dir, StackPorts.free(1, gateways=1), with_edge=False,
                       with_cache=False, service_env={"retrieval": retrieval_env})
    stack.start()
    try:
        result = asyncio.run(measure(stack, args.rounds))
    finally:
        stack.stop()
    markdown = render(result, GatewaySettings().ask_min_similarity)
    print(markdown)
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "retrieval-quality.json").write_text(json.dumps(result, indent=1))
    if not args.no_write and not retrieval_env:
        write_section(markdown, "retrieval-quality", "Retrieval quality: dense, BM25 and hybrid")


if __name__ == "__main__":
    main()
