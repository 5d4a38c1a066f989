"""Retrieval: HNSW recall@10 against exact search, search latency through the service, ingest throughput.

100,000 clustered unit vectors of dimension 384 go into the retrieval service's collection (tenant "bench")
straight through pymilvus; queries go through the retrieval service (Search with a vector) and, for the
comparison, straight to Milvus. Exact neighbours come from numpy. Ingest is measured end to end (chunking,
embedding on Triton, Milvus) through the gateway, against embedding the same chunks on Triton directly.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import numpy as np
from pymilvus import MilvusClient
from tritonclient.grpc import service_pb2_grpc

from bench.inference_path import ROOT, Sample, pct, run_load, write_section
from inference_mesh.v1 import mesh_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.common.embeddings import embed_via_kserve
from services.retrieval.chunking import Chunker
from services.retrieval.index import primary_key
from tools.stack import LocalStack, StackPorts

DIM = 384
TENANT = "bench"
AUTH = (("x-api-key", "mesh-dev-key"),)


def clustered(count: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM)).astype(np.float32)
    points = centres[rng.integers(0, clusters, count)] + rng.normal(scale=0.6, size=(count, DIM)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def load_vectors(uri: str, vectors: np.ndarray) -> tuple[float, dict]:
    """Insert, flush, and wait until HNSW has indexed every row: recall must come from the index."""
    client = MilvusClient(uri=uri, timeout=120)
    # The fields the collection was created with (BM25 terms only where the Milvus has sparse vectors).
    fields = {field["name"] for field in client.describe_collection("mesh_documents")["fields"]}
    text_fields = {name: value for name, value in (("heading", ""), ("terms", ""), ("passage", 0)) if name in fields}
    started = time.perf_counter()
    for start in range(0, len(vectors), 2000):
        rows = [{"pk": primary_key(TENANT, f"v{i}"), "tenant": TENANT, "document_id": f"v{i}", "chunk_id": f"v{i}",
                 "text": "", "metadata": {}, "vector": vectors[i].tolist(), **text_fields}
                for i in range(start, min(start + 2000, len(vectors)))]
        client.insert("mesh_documents", rows)
    client.flush("mesh_documents")
    deadline = time.monotonic() + 600
    while True:
        index = client.describe_index("mesh_documents", "vector")
        if index.get("pending_index_rows", 0) == 0 and index.get("indexed_rows", 0) >= len(vectors):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"HNSW index not built after 600 s: {index}")
        time.sleep(1)
    # Steady state: segments loaded sealed and indexed, as after any restart (freshly written data is
    # otherwise searched from growing segments, much slower on milvus-lite).
    client.release_collection("mesh_documents")
    client.load_collection("mesh_documents")
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed, index


async def measure_search(stack: LocalStack, vectors: np.ndarray, queries: np.ndarray, efs: list[int],
                         concurrencies: list[int]) -> tuple[list[dict], list[dict]]:
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    channel = grpc.aio.insecure_channel(stack.retrieval_address)
    service = retrieval_pb2_grpc.RetrievalStub(channel)
    direct = MilvusClient(uri=f"http://127.0.0.1:{stack.ports.milvus}", timeout=30)
    recall_rows = []
    for ef in efs:
        found = []
        for query in queries:
            answer = await service.Search(retrieval_pb2.TenantSearchRequest(
                tenant=TENANT, request=retrieval_pb2.SearchRequest(vector=query.tolist(), top_k=10, ef=ef)))
            found.append({int(h.document_id[1:]) for h in answer.hits})
        recall = np.mean([len(f & set(e.tolist())) / 10 for f, e in zip(found, exact, strict=True)])
        recall_rows.append({"ef": ef, "recall": float(recall)})

    def via_service(ef: int):
        index = iter(range(10**9))

        async def call() -> Sample:
            query = queries[next(index) % len(queries)]
            t0 = time.perf_counter()
            await service.Search(retrieval_pb2.TenantSearchRequest(
                tenant=TENANT, request=retrieval_pb2.SearchRequest(vector=query.tolist(), top_k=10, ef=ef)))
            return Sample(time.perf_counter() - t0)
        return call

    def via_milvus(ef: int):
        index = iter(range(10**9))

        async def call() -> Sample:
            query = queries[next(index) % len(queries)]
            t0 = time.perf_counter()
            await asyncio.to_thread(direct.search, "mesh_documents", data=[query.tolist()], limit=10,
                                    filter=f'tenant == "{TENANT}"', output_fields=["chunk_id", "document_id", "text",
                                                                                     "metadata"],
                                    search_params={"params": {"ef": ef}}, consistency_level="Session")
            return Sample(time.perf_counter() - t0)
        return call

    latency_rows = []
    ef = 64
    for concurrency in concurrencies:
        for path, factory in (("direct Milvus", via_milvus), ("retrieval service", via_service)):
            samples, elapsed = await run_load(factory(ef), concurrency, max(200, concurrency * 20))
            latencies = [s.latency_s * 1000 for s in samples]
            latency_rows.append({"path": path, "concurrency": concurrency, "p50": pct(latencies, 50),
                                 "p99": pct(latencies, 99), "rps": len(samples) / elapsed})
    await channel.close()
    direct.close()
    return recall_rows, latency_rows


async def measure_ingest(stack: LocalStack, documents: int) -> dict:
    texts = [" ".join(f"Document {d} sentence {s} describes topic {(d * 7 + s) % 50} in some detail."
                      for s in range(40)) for d in range(documents)]
    chunker = Chunker(str(ROOT / "triton_models/minilm/1/tokenizer.json"), 512, 128)
    chunks = [c.text for t in texts for c in chunker.split(t)]
    router = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}")
    triton = service_pb2_grpc.GRPCInferenceServiceStub(router)
    await embed_via_kserve(triton, "minilm", chunks[:64], 64, 300)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(chunks), 32):  # the same 32-chunk requests that ingest batches of 16 documents make
        await embed_via_kserve(triton, "minilm", chunks[start : start + 32], 64, 300)
    embed_only = time.perf_counter() - started
    await router.close()
    gateway = grpc.aio.insecure_channel(stack.gateway_address)
    mesh = mesh_pb2_grpc.InferenceMeshStub(gateway)

    async def batches():
        for start in range(0, documents, 16):
            batch = retrieval_pb2.UpsertDocumentsRequest()
            for d in range(start, min(start + 16, documents)):
                batch.documents.add(id=f"ingest/{d}", text=texts[d])
            yield batch

    started = time.perf_counter()
    summary = await mesh.UpsertDocuments(batches(), metadata=AUTH, timeout=600)
    end_to_end = time.perf_counter() - started
    await gateway.close()
    return {"documents": summary.documents, "chunks": summary.chunks, "seconds": end_to_end,
            "chunks_per_s": summary.chunks / end_to_end, "embed_only_per_s": len(chunks) / embed_only}


def render(backend: str, count: int, load_s: float, index: dict, recall_rows: list[dict], latency_rows: list[dict],
           ingest: dict) -> str:
    command = "make bench" if backend == "server" else f"python -m bench.retrieval --milvus {backend}"
    lines = [f"Command: `{command}`. {count:,} clustered unit vectors, dimension {DIM}, "
             f"HNSW M=16 efConstruction=200 (cosine) on "
             f"{'a Milvus 2.3.5 standalone (milvus-server)' if backend == 'server' else 'milvus-lite'}; "
             f"inserted, indexed and loaded in {load_s:.0f} s "
             f"(index state {index.get('state')}, {index.get('indexed_rows')} rows indexed). 200 queries, "
             "tenant filter on.", "",
             "| ef | recall@10 vs exact (numpy) |", "|---:|---:|"]
    lines += [f"| {r['ef']} | {r['recall']:.3f} |" for r in recall_rows]
    lines += ["", "Search latency, top_k 10, ef 64 (vector queries, no embedding):", "",
              "| path | concurrency | p50 ms | p99 ms | req/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['concurrency']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} |"
              for r in latency_rows]
    lines += ["", f"Ingest end to end through the gateway: {ingest['documents']} documents, {ingest['chunks']} chunks "
              f"in {ingest['seconds']:.1f} s = **{ingest['chunks_per_s']:.1f} chunks/s**; embedding the same chunks "
              f"on Triton directly: {ingest['embed_only_per_s']:.1f} chunks/s "
              f"(ingest/embedding = {ingest['chunks_per_s'] / ingest['embed_only_per_s']:.2f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--milvus", choices=["server", "lite"], default="server",
                        help="server: a Milvus standalone (milvus-server), as in production; lite: milvus-lite")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    # One draw, split: the queries come from the same clusters as the data but are not in it.
    points = clustered(args.vectors + 200, 2000, seed=1)
    vectors, queries = points[: args.vectors], points[args.vectors :]
    stack = LocalStack(ROOT / "build" / "bench-retrieval", StackPorts.free(1, gateways=1), with_edge=False,
                       with_cache=False, milvus_backend=args.milvus)
    stack.start()
    try:
        load_s, index = load_vectors(f"http://127.0.0.1:{stack.ports.milvus}", vectors)
        recall_rows, latency_rows = asyncio.run(measure_search(stack, vectors, queries, [16, 32, 64, 128], [1, 16]))
        ingest = asyncio.run(measure_ingest(stack, args.documents))
    finally:
        stack.stop()
    markdown = render(args.milvus, args.vectors, load_s, index, recall_rows, latency_rows, ingest)
    print(markdown)
    if not args.no_write:
        write_section(markdown, f"retrieval-{args.milvus}", f"Retrieval on {args.milvus}")


if __name__ == "__main__":
    main()
