"""The router's registry and replicas, reloadable from the registry file without a restart."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from dataclasses import dataclass, field

from pydantic import ValidationError

from services.common.internal_tls import InternalTls
from services.common.resilience import ResilienceSettings
from services.router.discovery import SrvDiscovery
from services.router.registry import Registry, ReplicaSpec
from services.router.replicas import ReplicaSet, retire

log = logging.getLogger(__name__)


@dataclass
class ReloadResult:
    changed: bool
    error: str = ""


@dataclass
class RouterState:
    registry_file: pathlib.Path
    registry: Registry
    replicas: ReplicaSet
    _mtime: float = 0.0
    _retiring: set[asyncio.Task] = field(default_factory=set)
    # Replicas found in DNS, per pool that discovers them (registry `discover`); the rest list theirs.
    discovered: dict[str, list[ReplicaSpec]] = field(default_factory=dict)

    @classmethod
    def load(cls, registry_file: str | pathlib.Path, resilience: ResilienceSettings | None = None,
             tls: InternalTls | None = None) -> RouterState:
        path = pathlib.Path(registry_file)
        registry = Registry.load(path)
        return cls(path, registry, ReplicaSet(registry, resilience, tls), path.stat().st_mtime)

    def reload(self) -> ReloadResult:
        """Swap in the file's registry if it parses and validates; otherwise keep the current one."""
        try:
            self._mtime = self.registry_file.stat().st_mtime
            registry = Registry.load(self.registry_file)
        except (OSError, ValueError, ValidationError) as exc:
            log.error("registry reload refused", extra={"file": str(self.registry_file), "error": str(exc)})
            return ReloadResult(False, f"{self.registry_file}: {exc}")
        if registry == self.registry:
            return ReloadResult(False)
        try:
            self._apply(registry)
        except ValueError as exc:
            log.error("registry reload refused", extra={"file": str(self.registry_file), "error": str(exc)})
            return ReloadResult(False, f"{self.registry_file}: {exc}")
        log.info("registry reloaded", extra={"models": sorted(registry.models),
                                             "replicas": [r.name for r in self.replicas.replicas]})
        return ReloadResult(True)

    def with_discovered(self, registry: Registry) -> Registry:
        """The registry with each discovering pool's replicas filled in from the last DNS answers."""
        if not any(pool.discover for pool in registry.pools.values()):
            return registry
        raw = registry.model_dump()
        for name, pool in registry.pools.items():
            if pool.discover is not None:
                raw["pools"][name]["discover"] = None
                raw["pools"][name]["replicas"] = [r.model_dump() for r in self.discovered.get(name, [])]
        return Registry.model_validate(raw)

    def _apply(self, registry: Registry) -> None:
        """Replicas to match `registry` (and what DNS found); removed ones are drained, then closed."""
        removed = self.replicas.sync(self.with_discovered(registry))
        self.registry = registry
        for replica in removed:
            task = asyncio.create_task(retire(replica))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def discover(self, discovery: SrvDiscovery) -> bool:
        """Asks DNS for every discovering pool's replicas; True when the replica set changed."""
        changed = False
        for name, pool in self.registry.pools.items():
            if pool.discover is None:
                continue
            found = await discovery.replicas(name, pool.discover)
            if found is not None and found != self.discovered.get(name):
                log.info("pool replicas changed in DNS", extra={
                    "pool": name, "before": [r.name for r in self.discovered.get(name, [])],
                    "after": [r.name for r in found]})
                self.discovered[name] = found
                changed = True
        if changed:
            try:
                self._apply(self.registry)
            except ValueError as exc:   # e.g. two pools' pods with one name: keep the replicas we have
                log.error("discovered replicas refused", extra={"error": str(exc)})
                return False
        return changed

    async def discover_forever(self, discovery: SrvDiscovery, interval_s: float) -> None:
        while True:
            await self.discover(discovery)
            await asyncio.sleep(interval_s)

    async def watch(self, interval_s: float) -> None:
        """Reloads when the file's modification time changes (an edit, or a ConfigMap update)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.registry_file.stat().st_mtime != self._mtime:
                    self.reload()
            except OSError as exc:
                log.warning("registry file unreadable", extra={"error": str(exc)})
