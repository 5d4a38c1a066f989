"""The tenant table a gateway or rate-limit replica serves from: read from the admin database at start-up,
then followed. A poll reads the revision only; a change (anything the admin API writes bumps it) reloads the whole
table and hands it to every consumer, so a change reaches this replica within one poll interval. While the
database cannot be read the replica keeps serving its last table (counted, logged), never an empty one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError

from services.admin.settings import AdminDatabase
from services.admin.store import AdminStore
from services.common.tenants import TenantConfig

log = logging.getLogger(__name__)

REVISION = Gauge("mesh_admin_directory_revision", "The admin database revision this replica serves")
RELOADS = Counter("mesh_admin_directory_reloads_total", "Tenant tables loaded after a change")
POLL_FAILURES = Counter("mesh_admin_directory_poll_failures_total",
                        "Polls of the admin database that failed (the last table stays in use)")
LAST_POLL = Gauge("mesh_admin_directory_last_poll_timestamp_seconds", "When the last successful poll ended")

Consumer = Callable[[TenantConfig], None]


def open_store(database: AdminDatabase, seed_file: str) -> AdminStore:
    """The store, migrated, and seeded from `seed_file` when it is empty and the settings allow it."""
    store = AdminStore.open(database.url)
    seeding = database.seed_if_empty and seed_file and store.is_empty()
    if seeding and store.import_config(TenantConfig.load(seed_file), only_if_empty=True):
        log.info("admin database seeded", extra={"seed_file": seed_file})
    return store


class TenantDirectory:
    def __init__(self, store: AdminStore | None, poll_s: float, seed_file: str = "") -> None:
        self.store = store
        self._poll_s = poll_s
        self._seed_file = seed_file
        self._consumers: list[Consumer] = []
        self.revision = 0
        self.config: TenantConfig | None = None

    @classmethod
    def open(cls, database: AdminDatabase, seed_file: str) -> TenantDirectory:
        """Loaded and ready to serve (blocking: at start-up). Without a database URL, the seed file alone."""
        store = open_store(database, seed_file) if database.url else None
        directory = cls(store, database.poll_s, seed_file)
        directory.load()
        return directory

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def subscribe(self, consumer: Consumer) -> None:
        self._consumers.append(consumer)

    def load(self) -> TenantConfig:
        """The table now (blocking: at start-up, before the replica serves)."""
        if self.store is None:
            self.config = TenantConfig.load(self._seed_file)
            return self.config
        self.revision, self.config = self.store.snapshot()
        REVISION.set(self.revision)
        return self.config

    async def follow(self) -> None:
        if self.store is None:
            return
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.poll()
            except SQLAlchemyError as exc:
                POLL_FAILURES.inc()
                log.warning("admin database poll failed; serving the last tenant table",
                            extra={"error": str(exc)[:300], "revision": self.revision})
            except Exception:  # the follower must outlive any one bad poll: the next one may succeed
                POLL_FAILURES.inc()
                log.exception("admin directory poll failed; serving the last tenant table")

    async def poll(self) -> bool:
        """Whether a change was found and handed on."""
        assert self.store is not None
        revision = await asyncio.to_thread(self.store.revision)
        LAST_POLL.set(time.time())
        if revision == self.revision:
            return False
        self.revision, self.config = await asyncio.to_thread(self.store.snapshot)
        for consumer in self._consumers:
            consumer(self.config)
        REVISION.set(self.revision)
        RELOADS.inc()
        return True
