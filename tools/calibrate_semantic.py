"""Calibrates the semantic cache on the labelled set: embeds every question with the cache's embedder on a real
Triton, then, for each false-hit budget, picks the lowest cosine threshold whose expected false-hit rate, with the
gate (services/cache/gate.py) in front, stays within the budget (see `calibrate`).
Writes config/semantic-calibration.yaml; `bench/semantic_cache.py` reports the held-out half.

    python -m tools.calibrate_semantic            # starts its own Triton (MiniLM only)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import yaml
from tritonclient.grpc import service_pb2_grpc

from services.cache.calibration import CALIBRATION_FILE
from services.cache.gate import load_gate
from services.common.embeddings import embed_via_kserve
from tools.semantic_pairs import PAIRS_FILE, load
from tools.triton import TritonInstall, TritonPorts, wait_triton_ready

HANDWRITTEN_FILE = PAIRS_FILE.parent / "handwritten.jsonl"
EMBEDDER, TRITON_MODEL = "all-minilm-l6-v2", "minilm"
BUDGETS = (0.01, 0.02, 0.05)
# The thresholds tried, from loose to strict.
THRESHOLDS = tuple(round(0.70 + 0.005 * i, 3) for i in range(59))


@dataclass(frozen=True)
class Scored:
    label: str
    split: str
    similarity: float
    gated: bool  # the gate refuses the pair
    kind: str = ""  # the kind of difference a near miss has


def wilson(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def rates(scored: Iterable[Scored], threshold: float, gate: bool) -> dict:
    """Paraphrase hit rate and near-miss false-hit rate at a threshold, with or without the gate."""
    rows = list(scored)
    served = [s for s in rows if s.similarity >= threshold and not (gate and s.gated)]
    paraphrases = sum(1 for s in rows if s.label == "paraphrase")
    near = sum(1 for s in rows if s.label == "near_miss")
    hits = sum(1 for s in served if s.label == "paraphrase")
    false_hits = sum(1 for s in served if s.label == "near_miss")
    return {"threshold": threshold, "paraphrase_hits": hits, "paraphrases": paraphrases,
            "false_hits": false_hits, "near_misses": near,
            "hit_rate": hits / paraphrases if paraphrases else 0.0,
            "false_hit_rate": false_hits / near if near else 0.0,
            "hit_ci": wilson(hits, paraphrases), "false_hit_ci": wilson(false_hits, near)}


def gate_miss_rate(validation: list[Scored], threshold: float) -> float:
    """How often the gate may let through a near miss at this similarity or above, on the validation split: the
    rule of succession, (missed + 1) / (near misses + 2), not the raw share. The gate lets none of the near
    misses it was written against through, and a raw 0 would vouch for any threshold; 0 of n counts as 1/(n+2),
    which shrinks only as more near misses are labelled."""
    near = [s for s in validation if s.label == "near_miss" and s.similarity >= threshold]
    return (sum(1 for s in near if not s.gated) + 1) / (len(near) + 2) if near else 0.0


def calibrate(tuning: list[Scored], validation: list[Scored], budget: float) -> float:
    """The lowest threshold (the most paraphrase hits) whose expected false-hit rate is within the budget: the
    share of tuning near misses at or above it, times how often the gate may miss one (`gate_miss_rate`), and
    the tuning split's own gated rate within the budget too."""
    for threshold in THRESHOLDS:
        bare = rates(tuning, threshold, gate=False)["false_hit_rate"]
        if bare * gate_miss_rate(validation, threshold) <= budget and \
                rates(tuning, threshold, gate=True)["false_hit_rate"] <= budget:
            return threshold
    return 1.0


async def embed_all(texts: list[str], address: str) -> dict[str, np.ndarray]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        vectors, _ = await embed_via_kserve(stub, TRITON_MODEL, texts, 64, 120.0)
    return dict(zip(texts, vectors, strict=True))


def score(rows: list[dict], vectors: dict[str, np.ndarray]) -> list[Scored]:
    # MiniLM's vectors are L2-normalised in the graph: the dot product is the cosine.
    gate = load_gate()
    return [Scored(r["label"], r["split"], float(vectors[r["a"]] @ vectors[r["b"]]),
                   gate.conflict(r["a"], r["b"]) is not None, r.get("kind") or r.get("category", "")) for r in rows]


def labelled_rows() -> list[dict]:
    return load() + load(HANDWRITTEN_FILE)


def reported_negatives(redis_url: str) -> list[dict]:
    """Wrong hits reported to a running cache (ReportWrongCacheHit): near misses for the tuning half."""
    import redis

    from services.cache.keys import NEGATIVES_KEY

    client = redis.Redis.from_url(redis_url)
    try:
        reported = [json.loads(raw) for raw in client.lrange(NEGATIVES_KEY, 0, -1)]
    finally:
        client.close()
    return [{"id": f"reported-{i}", "family": "reported", "category": "reported", "label": "near_miss",
             "split": "tuning", "a": r["question"], "b": r["candidate"]} for i, r in enumerate(reported)]


def scored_set(triton_address: str | None = None, extra: list[dict] | None = None) -> list[Scored]:
    """Every labelled pair (and `extra` ones) scored by the real embedder: on `triton_address`, else on a
    Triton started here."""
    rows = labelled_rows() + (extra or [])
    texts = sorted({t for r in rows for t in (r["a"], r["b"])})
    if triton_address:
        return score(rows, asyncio.run(embed_all(texts, triton_address)))
    ports = TritonPorts.free()
    with tempfile.TemporaryDirectory() as run_dir:
        triton = TritonInstall().start("triton-calibration", ports, Path(run_dir) / "triton.log",
                                       models=[TRITON_MODEL])
        try:
            wait_triton_ready(triton, ports)
            return score(rows, asyncio.run(embed_all(texts, f"127.0.0.1:{ports.grpc}")))
        finally:
            triton.stop()


def calibration(scored: list[Scored]) -> dict:
    tuning = [s for s in scored if s.split == "tuning"]
    validation = [s for s in scored if s.split == "validation"]
    thresholds = {budget: calibrate(tuning, validation, budget) for budget in BUDGETS}
    return {
        "embedder": EMBEDDER,
        "gate": "explained-differences",
        "calibrated_on": dt.date.today().isoformat(),
        "tuning_pairs": {"paraphrases": sum(s.label == "paraphrase" for s in tuning),
                         "near_misses": sum(s.label == "near_miss" for s in tuning)},
        "validation_near_misses": sum(s.label == "near_miss" for s in validation),
        "thresholds": dict(thresholds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--triton", help="host:port of a running Triton serving minilm (default: start one)")
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    parser.add_argument("--negatives-from", metavar="REDIS_URL",
                        help="add the wrong hits reported to the cache whose Redis this is, as tuning near misses")
    args = parser.parse_args()
    extra = reported_negatives(args.negatives_from) if args.negatives_from else []
    result = calibration(scored_set(args.triton, extra))
    result["reported_negatives"] = len(extra)
    header = ("# Written by `python -m tools.calibrate_semantic` from data/semantic-cache (tuning and validation\n"
              "# splits): the cosine threshold that keeps near-miss false hits within each budget, gate in front.\n")
    args.out.write_text(header + yaml.safe_dump(result, sort_keys=False))
    print(yaml.safe_dump(result, sort_keys=False))


if __name__ == "__main__":
    main()
