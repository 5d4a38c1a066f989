"""A live terminal view of the local stack (`make top`): per service, requests/s, p99 latency, errors/s and the
cache hit rate, from the services' Prometheus endpoints, refreshed every few seconds.

Rates are differences between two scrapes; p99 comes from the histogram buckets that moved in between.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# `make up`'s metrics ports.
DEFAULT_ENDPOINTS = ["gateway=127.0.0.1:9101", "gateway-2=127.0.0.1:9111", "router=127.0.0.1:9102",
                     "cache=127.0.0.1:9103", "retrieval=127.0.0.1:9104", "ratelimit=127.0.0.1:9105"]
ERROR_CODES = {"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS"}


@dataclass
class Scrape:
    at: float
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    cache_hits: float = 0.0
    cache_lookups: float = 0.0
    up: bool = True


def scrape(address: str) -> Scrape:
    now = time.monotonic()
    try:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=2).read().decode()
    except OSError:
        return Scrape(now, up=False)
    result = Scrape(now)
    buckets: dict[float, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mesh_rpc_requests_total":
                result.requests += sample.value
                if sample.labels.get("code") in ERROR_CODES:
                    result.errors += sample.value
            elif sample.name == "mesh_rpc_duration_seconds_bucket":
                buckets[float(sample.labels["le"])] += sample.value
            elif sample.name == "mesh_cache_lookups_total":
                result.cache_lookups += sample.value
                if "hit" in sample.labels.get("result", ""):
                    result.cache_hits += sample.value
    result.buckets = dict(buckets)
    return result


def p99_ms(before: Scrape, after: Scrape) -> float:
    moved = sorted((le, after.buckets.get(le, 0.0) - before.buckets.get(le, 0.0)) for le in after.buckets)
    total = moved[-1][1] if moved else 0.0
    if total <= 0:
        return math.nan
    rank, lower, below = 0.99 * total, 0.0, 0.0
    for le, count in moved:
        if count >= rank:
            if math.isinf(le):
                return lower * 1000
            return (lower + (le - lower) * (rank - below) / max(count - below, 1e-9)) * 1000
        lower, below = le, count
    return math.nan


def frame(endpoints: dict[str, str], before: dict[str, Scrape], after: dict[str, Scrape]) -> str:
    lines = [f"inference mesh  {time.strftime('%H:%M:%S')}",
             f"{'service':<12}{'req/s':>9}{'p99 ms':>10}{'errors/s':>10}{'cache hit':>11}"]
    for name in endpoints:
        old, new = before[name], after[name]
        if not new.up:
            lines.append(f"{name:<12}{'down':>9}")
            continue
        seconds = max(new.at - old.at, 1e-9)
        rate = (new.requests - old.requests) / seconds
        errors = (new.errors - old.errors) / seconds
        lookups = new.cache_lookups - old.cache_lookups
        hit = f"{(new.cache_hits - old.cache_hits) / lookups:.0%}" if lookups > 0 else "-"
        p99 = p99_ms(old, new) if old.up else math.nan
        lines.append(f"{name:<12}{rate:>9.1f}{'-' if math.isnan(p99) else f'{p99:.1f}':>10}{errors:>10.2f}{hit:>11}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", action="append", help="name=host:port of a metrics endpoint (repeatable)")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    args = parser.parse_args()
    endpoints = dict(e.split("=", 1) for e in (args.endpoint or DEFAULT_ENDPOINTS))
    before = {name: scrape(address) for name, address in endpoints.items()}
    if not any(s.up for s in before.values()):
        sys.exit("no metrics endpoint answers: start the stack with `make up` first")
    while True:
        time.sleep(args.interval)
        after = {name: scrape(address) for name, address in endpoints.items()}
        text = frame(endpoints, before, after)
        if args.once:
            print(text)
            return
        print("\033[2J\033[H" + text, flush=True)
        before = after


if __name__ == "__main__":
    main()
