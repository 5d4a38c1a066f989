"""Reading a process's Prometheus endpoint on loopback: the one scrape-and-sum the tests, benches and tools share."""

from __future__ import annotations

import urllib.request


def metric_sum(port: int, name: str, **labels: str) -> float:
    """`name` summed over the label sets that carry every one of `labels` (an unlabelled metric too)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")) and all(label in line for label in wanted))
