"""Reads each replica's Triton metrics endpoint: pending requests and queue time per model."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.request

from services.router.replicas import QueueState, Replica, ReplicaSet

log = logging.getLogger(__name__)
_SAMPLE = re.compile(r'^(nv_inference_pending_request_count|nv_inference_queue_duration_us|'
                     r'nv_inference_request_success)\{([^}]*)\} ([0-9.eE+-]+)$')
_MODEL = re.compile(r'model="([^"]*)"')


def parse(text: str) -> dict[str, dict[str, float]]:
    """{triton model: {metric: value summed over versions}} for the three metrics the router uses."""
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        model = _MODEL.search(match.group(2))
        if model:
            metrics = found.setdefault(model.group(1), {})
            metrics[match.group(1)] = metrics.get(match.group(1), 0.0) + float(match.group(3))
    return found


def update(replica: Replica, samples: dict[str, dict[str, float]]) -> None:
    for model, metrics in samples.items():
        previous = replica.queues.get(model, QueueState())
        queue_us = metrics.get("nv_inference_queue_duration_us", 0.0)
        requests = metrics.get("nv_inference_request_success", 0.0)
        finished = requests - previous.requests_total
        pending = int(metrics.get("nv_inference_pending_request_count", 0))
        if finished > 0:
            queue_ms = (queue_us - previous.queue_us_total) / finished / 1000
        else:
            # Nothing finished since the last scrape: with requests waiting the last mean stands (a stuck queue must
            # not read as empty); with none waiting there is no queue, whatever it was before.
            queue_ms = previous.queue_ms if pending else 0.0
        replica.queues[model] = QueueState(pending=pending,
                                           queue_ms=max(0.0, queue_ms), queue_us_total=queue_us,
                                           requests_total=requests)


def _fetch(endpoint: str, timeout_s: float) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout_s) as answer:
        return answer.read().decode("utf-8", "replace")


async def scrape(replica: Replica, timeout_s: float) -> None:
    if not replica.metrics_endpoint:
        return
    try:
        update(replica, parse(await asyncio.to_thread(_fetch, replica.metrics_endpoint, timeout_s)))
    except OSError as exc:
        # Unknown queue state reads as empty; readiness (the prober) decides whether the replica is used at all.
        replica.queues.clear()
        log.debug("metrics unavailable", extra={"replica": replica.name, "error": str(exc)})


async def scrape_forever(replicas: ReplicaSet, interval_s: float, timeout_s: float) -> None:
    while True:
        await asyncio.gather(*(scrape(r, timeout_s) for r in list(replicas.replicas)))
        await asyncio.sleep(interval_s)
