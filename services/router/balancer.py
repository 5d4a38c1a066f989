"""Replica choice: the first pool (in the model's order of preference) with a ready, undrained replica, then the
model's policy within it.

- least_outstanding: fewest requests in flight from this router (ties take turns).
- queue_aware: lowest load, which adds Triton's own pending count and measured queue time (replicas.Replica.load).
- prefix_affinity: requests with the same affinity key (a session, or a long shared system prompt) go to the key's
  home replica while its in-flight count stays within `load_factor` times the mean (bounded-load consistent
  hashing); past that they spill to the key's next replica in rendezvous order. A key's home is chosen when the
  key is first seen: the first replica in its rendezvous order that owns fewer than its share of the live keys,
  so that 8 tenants on 2 replicas split 4/4 (each replica's KV-prefix memory holds its share) instead of
  whatever the hash gives. Keys unseen for `key_idle_s` are forgotten. No key: queue_aware.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import Counter as Tally
from collections import OrderedDict
from dataclasses import dataclass, replace

from prometheus_client import Counter

from services.router.registry import ModelSpec
from services.router.replicas import Replica, ReplicaSet

# What `free_slots` says of a pool without a bound: more than any queue could hold.
UNBOUNDED_SLOTS = 1 << 30
AFFINITY = Counter("mesh_router_affinity_total", "Prefix-affinity choices: home replica, spilled, or no key",
                   ["model", "result"])


class NoReplicaError(Exception):
    pass


class AtCapacityError(NoReplicaError):
    """Ready replicas exist, but every one is at its in-flight bound: shed the request."""


@dataclass(frozen=True)
class BalancerSettings:
    queue_ms_per_slot: float = 50.0
    affinity_load_factor: float = 1.5
    # An absolute cap on a home replica's load (0: only the relative bound).
    affinity_max_load: float = 0.0
    key_idle_s: float = 600.0
    max_keys: int = 100_000
    # A replica with this many requests in flight from this router takes no more (0: no bound).
    max_in_flight_per_replica: int = 0
    # Placements' own bounds per model (the fair queues' trigger); off: first come, first served in Triton.
    placement_bounds: bool = True


@dataclass(frozen=True)
class Route:
    affinity_key: str = ""
    exclude: frozenset[str] = frozenset()
    # What the canary version sticks to (the session, else the tenant), on the model and on its fallback alike.
    version_key: str = ""
    # Capabilities the request needs (registry.CAPABILITIES): only placements that declare them are candidates.
    needs: frozenset[str] = frozenset()

    def excluding(self, replica: str) -> Route:
        return replace(self, exclude=self.exclude | {replica})


@dataclass(frozen=True)
class Choice:
    replica: Replica
    # Sent away from its key's home: the replica should serve it without caching its prefix, which would only
    # evict one of the prefixes it is home to.
    spilled: bool = False
    # Preferred pools that have replicas but none could take the request (down, draining, breaker open, full).
    passed_over: tuple[str, ...] = ()


def _rank(key: str, replica: Replica) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica.name}".encode(), digest_size=8).digest(), "big")


class KeyHomes:
    """Which replica is home to each live affinity key, with live keys spread evenly over the replicas."""

    def __init__(self, idle_s: float, max_keys: int) -> None:
        self._homes: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._owned: Tally[str] = Tally()
        self._idle_s = idle_s
        self._max_keys = max_keys

    def _forget_stale(self, now: float) -> None:
        while self._homes:
            key, (replica, seen) = next(iter(self._homes.items()))
            if now - seen < self._idle_s and len(self._homes) <= self._max_keys:
                return
            del self._homes[key]
            self._owned[replica] -= 1

    def home(self, key: str, ranked: list[Replica]) -> Replica:
        # Keys are chosen by callers (sessions, KServe parameters): kept as fixed-size digests, so memory is
        # bounded by max_keys whatever their length.
        key = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        now = time.monotonic()
        self._forget_stale(now)
        by_name = {r.name: r for r in ranked}
        known = self._homes.get(key)
        if known is not None and known[0] in by_name:
            self._homes[key] = (known[0], now)
            self._homes.move_to_end(key)
            return by_name[known[0]]
        if known is not None:  # its home left the pool (drained, failed, removed): choose again
            self._owned[known[0]] -= 1
        live = sum(self._owned[name] for name in by_name)
        share = math.ceil((live + 1) / len(ranked))
        chosen = next((r for r in ranked if self._owned[r.name] < share), ranked[0])
        self._homes[key] = (chosen.name, now)
        self._homes.move_to_end(key)
        self._owned[chosen.name] += 1
        return chosen


class Balancer:
    def __init__(self, replicas: ReplicaSet, settings: BalancerSettings | None = None) -> None:
        self._replicas = replicas
        self._settings = settings or BalancerSettings()
        # Breaks ties in turn, so equal loads still spread.
        self._tiebreak = itertools.count()
        self._homes = KeyHomes(self._settings.key_idle_s, self._settings.max_keys)

    def can_serve(self, model: ModelSpec) -> bool:
        return any(r.serves(model.triton_model) for pool in model.pool_names for r in self._replicas.in_pool(pool))

    def can_serve_any(self, *models: ModelSpec | None) -> bool:
        """Some replica can take one of these models (a model and its fallback)."""
        return any(model is not None and self.can_serve(model) for model in models)

    def candidates(self, model: ModelSpec, exclude: frozenset[str] = frozenset(),
                   needs: frozenset[str] = frozenset()) -> tuple[list[Replica], tuple[str, ...]]:
        """The usable replicas of the first pool (in the model's order) that has any, and the preferred pools
        passed over on the way (pools with replicas, none usable)."""
        bound = self._settings.max_in_flight_per_replica
        applied: list[str] = []  # the bounds that left a replica without a free slot, named as they applied
        passed_over: list[str] = []
        for placement in model.pools:
            if not needs <= placement.capabilities:
                continue
            pool = placement.pool
            model_bound = placement.max_in_flight_per_replica if self._settings.placement_bounds else 0
            members = self._replicas.in_pool(pool)
            found = [r for r in members if r.serves(model.triton_model) and r.name not in exclude]
            if bound or model_bound:
                free = []
                for replica in found:
                    if model_bound and replica.in_flight_of(model.triton_model) >= model_bound:
                        applied.append(f"{model_bound} of this model in flight per replica, its bound in pool {pool}")
                    elif bound and replica.in_flight >= bound:
                        applied.append(f"{bound} requests in flight per replica")
                    else:
                        free.append(replica)
                found = free
            if found:
                return found, tuple(passed_over)
            if members:
                passed_over.append(pool)
        if applied:
            raise AtCapacityError(f"every ready replica for {model.triton_model!r} is at its bound "
                                  f"({'; '.join(dict.fromkeys(applied))}); retry with backoff")
        raise NoReplicaError(f"no ready replica for Triton model {model.triton_model!r} in pools {model.pool_names}")

    def slots(self, model: ModelSpec) -> int:
        """How many requests of `model` its first usable pool runs at once (for admission's wait estimates)."""
        for placement in model.pools:
            ready = [r for r in self._replicas.in_pool(placement.pool) if r.serves(model.triton_model)]
            if ready:
                per = placement.max_in_flight_per_replica or self._settings.max_in_flight_per_replica or 1
                return per * len(ready)
        return 1

    def free_slots(self, model: ModelSpec) -> int:
        """Slots of `model` free now in its first usable pool (the bounds as `candidates` applies them); a pool
        without a bound has slots to spare: a large number."""
        for placement in model.pools:
            ready = [r for r in self._replicas.in_pool(placement.pool) if r.serves(model.triton_model)]
            if ready:
                model_bound = placement.max_in_flight_per_replica if self._settings.placement_bounds else 0
                bound = self._settings.max_in_flight_per_replica
                if not (model_bound or bound):
                    return UNBOUNDED_SLOTS  # nothing queues, and batch work is never held
                return sum(max(0, min(
                    model_bound - r.in_flight_of(model.triton_model) if model_bound else UNBOUNDED_SLOTS,
                    bound - r.in_flight if bound else UNBOUNDED_SLOTS)) for r in ready)
        return 0

    def load(self, replica: Replica, model: ModelSpec) -> float:
        return replica.load(model.triton_model, self._settings.queue_ms_per_slot)

    def choose(self, model: ModelSpec, route: Route | None = None) -> Replica:
        return self.place(model, route).replica

    def place(self, model: ModelSpec, route: Route | None = None) -> Choice:
        route = route or Route()
        candidates, passed_over = self.candidates(model, route.exclude, route.needs)
        shift = next(self._tiebreak) % len(candidates)
        rotated = candidates[shift:] + candidates[:shift]
        if model.routing == "least_outstanding":
            return Choice(min(rotated, key=lambda r: r.in_flight), passed_over=passed_over)
        if model.routing == "prefix_affinity":
            if route.affinity_key:
                chosen = self._affine(model, rotated, route.affinity_key)
                return Choice(chosen.replica, chosen.spilled, passed_over)
            AFFINITY.labels(model.triton_model, "no_key").inc()
        return Choice(min(rotated, key=lambda r: self.load(r, model)), passed_over=passed_over)

    def _affine(self, model: ModelSpec, candidates: list[Replica], key: str) -> Choice:
        # The bound uses this router's in-flight counts: exact at the moment of choice. Triton's metrics lag a
        # scrape interval, and a queue that has just drained would push a key off its home for nothing.
        loads = {r.name: float(r.in_flight) for r in candidates}
        # The bound counts the request being placed, so an idle pool always accepts it at home.
        bound = max(1.0, math.ceil((sum(loads.values()) + 1) / len(candidates) * self._settings.affinity_load_factor))
        if self._settings.affinity_max_load:
            bound = min(bound, self._settings.affinity_max_load)
        ranked = sorted(candidates, key=lambda r: _rank(key, r), reverse=True)
        home = self._homes.home(key, ranked)
        order = [home, *(r for r in ranked if r is not home)]
        for position, replica in enumerate(order):
            if loads[replica.name] + 1 <= bound:
                AFFINITY.labels(model.triton_model, "home" if position == 0 else "spilled").inc()
                return Choice(replica, spilled=position > 0)
        AFFINITY.labels(model.triton_model, "spilled").inc()
        chosen = min(order, key=lambda r: loads[r.name])
        return Choice(chosen, spilled=chosen is not home)
