"""The router's registry and replicas, reloadable from the registry file without a restart."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from dataclasses import dataclass, field

from pydantic import ValidationError

from services.common.internal_tls import InternalTls
from services.common.resilience import ResilienceSettings
from services.router.registry import Registry
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
        removed = self.replicas.sync(registry)
        self.registry = registry
        for replica in removed:
            task = asyncio.create_task(retire(replica))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info("registry reloaded", extra={"models": sorted(registry.models),
                                             "replicas": [r.name for r in self.replicas.replicas]})
        return ReloadResult(True)

    async def watch(self, interval_s: float) -> None:
        """Reloads when the file's modification time changes (an edit, or a ConfigMap update)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.registry_file.stat().st_mtime != self._mtime:
                    self.reload()
            except OSError as exc:
                log.warning("registry file unreadable", extra={"error": str(exc)})
