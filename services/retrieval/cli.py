"""`python -m services.retrieval ingest DIR`: upsert every .txt and .md file under DIR through the public edge
(Envoy, TLS), where the caller's key is checked, rate-limited and metered like any other call."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from inference_mesh.v1 import mesh_pb2_grpc, retrieval_pb2

SUFFIXES = {".txt", ".md"}


def find_documents(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def progress(done: int, total: int, width: int = 30) -> None:
    # Documents sent, not indexed: the gateway answers once every chunk is embedded and stored, so the rate that
    # matters is in the summary; a rate here would only say how fast files were read.
    filled = int(width * done / max(total, 1))
    waiting = "  (embedding and indexing ...)" if done == total else ""
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} documents sent{waiting}")
    sys.stderr.flush()


def batches(root: Path, files: list[Path], size: int) -> Iterator[retrieval_pb2.UpsertDocumentsRequest]:
    for start in range(0, len(files), size):
        batch = retrieval_pb2.UpsertDocumentsRequest()
        for path in files[start : start + size]:
            relative = path.relative_to(root).as_posix()
            batch.documents.add(id=relative, text=path.read_text(encoding="utf-8", errors="replace"),
                                metadata={"path": relative, "type": path.suffix.lower().lstrip(".")})
        yield batch
        progress(min(start + size, len(files)), len(files))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.retrieval ingest", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--edge", default="localhost:8443", help="the mesh's public address (Envoy)")
    parser.add_argument("--ca", type=Path, default=Path("run/pki/ca.pem"),
                        help="the CA certificate to trust for the edge (make up's own: run/pki/ca.pem)")
    parser.add_argument("--plaintext", action="store_true",
                        help="no TLS: --edge names a gateway on loopback (a stack without Envoy)")
    parser.add_argument("--api-key", default=os.environ.get("MESH_API_KEY", "mesh-dev-key"))
    parser.add_argument("--batch", type=int, default=16, help="documents per streamed batch")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    files = find_documents(args.directory)
    if not files:
        parser.error(f"no .txt or .md files under {args.directory}")
    if not args.plaintext and not args.ca.is_file():
        parser.error(f"{args.ca} is missing: start the stack (make up) or give --ca")
    started = time.monotonic()
    with (grpc.insecure_channel(args.edge) if args.plaintext else
          grpc.secure_channel(args.edge, grpc.ssl_channel_credentials(args.ca.read_bytes()))) as channel:
        stub = mesh_pb2_grpc.InferenceMeshStub(channel)
        try:
            summary = stub.UpsertDocuments(batches(args.directory, files, args.batch),
                                           metadata=[("x-api-key", args.api_key)], timeout=3600)
        except grpc.RpcError as exc:
            sys.stderr.write(f"\ningest failed: {exc.code().name}: {exc.details()}\n")
            sys.exit(1)
    seconds = time.monotonic() - started
    sys.stderr.write("\n")
    print(f"ingested {summary.documents} documents, {summary.chunks} chunks in {seconds:.1f} s "
          f"({summary.chunks / max(seconds, 1e-9):.1f} chunks/s)")
