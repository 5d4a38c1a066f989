"""Weighted, sticky version choice (canary / A-B), shared by the gateway and the router.

A stable hash of (model, sticky key) picks a point in [0, 1); the cumulative weights, in version order, pick the
version. Every router and gateway replica agrees without sharing state, a caller stays on its version, and a
weight change moves only the callers whose point falls in the shifted band.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping


def sticky_point(model: str, key: str) -> float:
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_version(model: str, weights: Mapping[str, int], key: str, default: str = "") -> str:
    if not weights:
        return default
    total = sum(weights.values())
    point = sticky_point(model, key or secrets.token_hex(8)) * total
    for version in sorted(weights, key=lambda v: (len(v), v)):
        point -= weights[version]
        if point < 0:
            return version
    return max(weights, key=weights.__getitem__)
