"""The admin database (services/admin) on SQLite and on a real PostgreSQL server, the same tests on both:
migrations, the key lifecycle, the seed file, and bad input refused with nothing written."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import text

from inference_mesh.v1 import admin_pb2
from services.admin.database import admin_engine
from services.admin.migrations import MIGRATIONS, migrate
from services.admin.store import AdminStore
from services.admin.usage import DROPPED, UsageRecord, UsageSettings, UsageWriter
from services.admin.usage_reports import UsageQuery, report
from services.common.errors import MeshError
from services.common.tenants import ApiKey, Tenant, TenantConfig, Tier, hash_key

SEED = TenantConfig(tiers={"standard": Tier(requests_per_minute=300, burst=30, tokens_per_minute=20000),
                           "enterprise": Tier(requests_per_minute=1000, burst=50, tokens_per_month=10**6)},
                    tenants=[Tenant(id="acme", tier="standard", api_key_sha256=[hash_key("acme-key")])])


@pytest.fixture
def store(url) -> Iterator[AdminStore]:
    opened = AdminStore.open(url)
    opened.import_config(SEED)
    yield opened
    opened.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(MeshError) as refused:
        call()
    return refused.value.code


def test_migrations_apply_once_even_from_two_replicas_at_once(url):
    engines = [admin_engine(url) for _ in range(2)]
    applied: list[list[int]] = []
    threads = [threading.Thread(target=lambda e=e: applied.append(migrate(e))) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(applied, key=len) == [[], [m.version for m in MIGRATIONS]]
    assert migrate(engines[0]) == [], "a second start applies nothing"
    with engines[0].connect() as connection:
        recorded = connection.execute(text("SELECT version FROM mesh_schema_versions ORDER BY version")).scalars()
        assert list(recorded) == [m.version for m in MIGRATIONS]
    for engine in engines:
        engine.dispose()


def test_a_key_is_created_listed_rotated_and_revoked(store):
    key, secret = store.create_key("acme", allowed_models=["m1"], labels={"team": "search"})
    assert secret.startswith("mk_") and key.prefix == secret[:10] and secret not in str(key)
    revision, table = store.snapshot()
    grants = {k.sha256: k for k in table.tenant("acme").all_keys()}
    assert grants[hash_key(secret)].allowed_models == ["m1"] and grants[hash_key(secret)].labels == {"team": "search"}
    assert [k.id for k in store.list_keys(prefix=secret[:12])] == [key.id], "found by the secret's start"
    assert store.list_keys(prefix="mk_%") == [], "a prefix is compared, never a LIKE pattern"

    before = time.time()
    new_key, new_secret = store.rotate_key(key.id, overlap_s=600)
    old = next(k for k in store.list_keys(tenant="acme") if k.id == key.id)
    assert before + 600 <= old.expires_at <= time.time() + 600, "the old key works for the overlap only"
    assert new_key.allowed_models == ["m1"] and dict(new_key.labels) == {"team": "search"}
    assert store.revision() > revision

    revoked = store.revoke_key(new_key.id)
    assert revoked.revoked_at > 0
    assert hash_key(new_secret) not in {k.sha256 for k in store.snapshot()[1].tenant("acme").all_keys()}
    assert _code(lambda: store.revoke_key(new_key.id)) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: store.rotate_key(new_key.id, 60)) == grpc.StatusCode.FAILED_PRECONDITION
    assert new_key.id in {k.id for k in store.list_keys(tenant="acme", include_revoked=True)}


def test_a_key_limit_under_its_tier_is_kept_and_rotated(store):
    key, _ = store.create_key("acme", requests_per_minute=60, burst=3, tokens_per_minute=500)
    assert (key.requests_per_minute, key.burst, key.tokens_per_minute) == (60, 3, 500)
    grant = next(k for k in store.snapshot()[1].tenant("acme").all_keys() if k.id == key.id)
    assert (grant.requests_per_minute, grant.burst, grant.tokens_per_minute) == (60, 3, 500)
    successor, _ = store.rotate_key(key.id, 60)
    assert (successor.requests_per_minute, successor.burst, successor.tokens_per_minute) == (60, 3, 500)


def test_tenants_move_tiers_and_are_suspended(store):
    store.create_tenant("beta", "standard")
    assert store.update_tenant("beta", tier="enterprise").tier == "enterprise"
    assert store.update_tenant("beta", suspended=True).suspended
    assert store.snapshot()[1].tenant("beta").suspended
    store.put_tier(admin_pb2.AdminTier(name="standard", requests_per_minute=600, burst=60))
    assert store.snapshot()[1].tiers["standard"].requests_per_minute == 600


def test_a_tiers_batch_terms_are_kept_and_served(store):
    put = admin_pb2.AdminTier(name="standard", requests_per_minute=300, burst=30, batch_discount=0.5,
                              max_batch_files=3, max_batches_in_flight=2)
    store.put_tier(put)
    served = store.snapshot()[1].tiers["standard"]
    assert (served.batch_discount, served.max_batch_files, served.max_batches_in_flight) == (0.5, 3, 2)
    (listed,) = [t for t in store.list_tiers() if t.name == "standard"]
    assert (listed.batch_discount, listed.max_batch_files, listed.max_batches_in_flight) == (0.5, 3, 2)
    assert store.snapshot()[1].tiers["enterprise"].batch_discount == 0.0, "unset: full price"


def test_a_database_from_before_batch_terms_upgrades_with_full_price(url, monkeypatch):
    """Migration 5 on a database with tiers: they keep their limits, at full price and the deployment's batch
    limits (the columns' defaults), and nothing else changes."""
    from services.admin import migrations

    engine = admin_engine(url)
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:4])
    assert migrate(engine) == [1, 2, 3, 4]
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO mesh_tiers (name, requests_per_minute, burst, tokens_per_minute, "
                                "tokens_per_month, share_weight, max_stored_vectors) "
                                "VALUES ('old', 60, 6, 0, 0, 2.0, 0)"))
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    assert migrate(engine) == [5]
    engine.dispose()
    opened = AdminStore.open(url)
    try:
        old = opened.snapshot()[1].tiers["old"]
        assert (old.requests_per_minute, old.share_weight, old.batch_discount, old.max_batch_files,
                old.max_batches_in_flight) == (60, 2.0, 0.0, 0, 0)
    finally:
        opened.close()


@pytest.mark.parametrize("bad, code", [
    (lambda s: s.create_tenant("acme", "standard"), grpc.StatusCode.ALREADY_EXISTS),
    (lambda s: s.create_tenant("new", "gold"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_tenant("bad name; DROP TABLE mesh_tenants", "standard"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.update_tenant("acme", tier="gold"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.update_tenant("nobody", suspended=True), grpc.StatusCode.NOT_FOUND),
    (lambda s: s.update_tenant("acme"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", labels={"team": "x" * 257}), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", labels={"Team Name": "x"}), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", labels={f"l{i}": "x" for i in range(17)}), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", labels={"team": "a\nb"}), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", allowed_models=["../etc"]), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", expires_at=1.0), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("nobody"), grpc.StatusCode.NOT_FOUND),
    (lambda s: s.create_key("acme", requests_per_minute=301, burst=5), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", requests_per_minute=60, burst=31), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", requests_per_minute=60), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.create_key("acme", tokens_per_minute=20001), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.rotate_key("key_nope", 60), grpc.StatusCode.NOT_FOUND),
    (lambda s: s.rotate_key("key_nope", -1), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.put_tier(admin_pb2.AdminTier(name="zero", requests_per_minute=0, burst=1)),
     grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.put_tier(admin_pb2.AdminTier(name="free", requests_per_minute=1, burst=1, batch_discount=1.0)),
     grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.put_tier(admin_pb2.AdminTier(name="surcharge", requests_per_minute=1, burst=1,
                                              batch_discount=-0.5)), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.list_keys(prefix="\x00"), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_input_is_refused_and_nothing_is_written(store, bad, code):
    revision, table = store.snapshot()
    assert _code(lambda: bad(store)) == code
    assert store.snapshot() == (revision, table)


def test_the_seed_is_read_once_and_export_imports_back(store, url):
    assert not store.import_config(TenantConfig(tiers={"other": Tier(requests_per_minute=1, burst=1)}, tenants=[]),
                                   only_if_empty=True), "a database with tiers is not seeded again"
    key, secret = store.create_key("acme", expires_at=time.time() + 3600, labels={"env": "prod"})
    exported = store.export_config()
    fresh = AdminStore.open(url.replace("admin.sqlite3", "copy.sqlite3")) if url.startswith("sqlite") else None
    if fresh is not None:
        assert fresh.import_config(exported, only_if_empty=True)
        copied = {k.sha256: k for k in fresh.snapshot()[1].tenant("acme").all_keys()}
        assert copied[hash_key(secret)] == ApiKey(sha256=hash_key(secret), id=key.id, prefix=key.prefix,
                                                  expires_at=key.expires_at, labels={"env": "prod"})
        assert hash_key("acme-key") in copied
        fresh.close()
    store.revoke_key(key.id)
    store.import_config(exported)
    assert hash_key(secret) not in {k.sha256 for k in store.snapshot()[1].tenant("acme").all_keys()}, \
        "importing an old export never brings a revoked key back"


def _record(at: float, tenant: str = "acme", model: str = "m", output: int = 5, cache: str = "CACHE_STATUS_MISS",
            kind: str = "generate", status: str = "OK") -> UsageRecord:
    hit = cache == "CACHE_STATUS_EXACT_HIT"
    return UsageRecord(at=at, tenant=tenant, key_id=f"key_{tenant}", kind=kind, model=model, version="1", pool="cpu",
                       request_id="r", status=status, cache=cache, input_tokens=10, output_tokens=output,
                       cached_tokens=10 + output if hit else 0, latency_ms=5.0, ttft_ms=1.0,
                       cost_usd=0.0 if hit else (10 + output) * 0.5 / 1000)


async def _write(store: AdminStore, records: list[UsageRecord], **settings) -> UsageWriter:
    writer = UsageWriter(store, UsageSettings(flush_s=0.05, **settings))
    task = asyncio.create_task(writer.run())
    for record in records:
        writer.record(record)
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return writer


def test_usage_is_reported_in_openai_buckets_and_groups(store):
    day = 86400
    start = (int(time.time()) // day - 3) * day
    records = [_record(start + 60), _record(start + 120, model="n", output=7),
               _record(start + day + 5, tenant="beta", cache="CACHE_STATUS_EXACT_HIT"),
               _record(start + day + 6, tenant="beta", status="CANCELLED", output=2),
               _record(start + 2 * day + 1, kind="embed", output=0)]
    asyncio.run(_write(store, records))
    page = report(store.engine, UsageQuery("completions", start, start + 3 * day, "1d", group_by=("project_id",)))
    assert [len(b["results"]) for b in page["data"]] == [1, 1, 0], "one bucket a day, embeddings apart"
    first, second = page["data"][0]["results"][0], page["data"][1]["results"][0]
    assert (first["project_id"], first["input_tokens"], first["output_tokens"], first["num_model_requests"]) == \
        ("acme", 20, 12, 2)
    assert second["mesh_cache_hits"] == 1 and second["mesh_tokens_saved"] == 15
    assert second["mesh_failed_or_cancelled"] == 1 and second["object"] == "organization.usage.completions.result"
    by_model = report(store.engine, UsageQuery("completions", start, start + day, "1d", group_by=("model",)))
    assert sorted((r["model"], r["output_tokens"]) for r in by_model["data"][0]["results"]) == [("m", 5), ("n", 7)]
    embeddings = report(store.engine, UsageQuery("embeddings", start, start + 3 * day, "1d"))
    assert [r["input_tokens"] for b in embeddings["data"] for r in b["results"]] == [10]
    costs = report(store.engine, UsageQuery("costs", start, start + 3 * day, "1d", group_by=("project_id",)))
    assert sum(r["amount"]["value"] for b in costs["data"] for r in b["results"]) == pytest.approx(
        sum(r.cost_usd for r in records))
    paged = report(store.engine, UsageQuery("completions", start, start + 3 * day, "1d", limit=2))
    assert paged["has_more"] and len(paged["data"]) == 2
    rest = report(store.engine, UsageQuery("completions", start, start + 3 * day, "1d", page=paged["next_page"]))
    assert [b["start_time"] for b in rest["data"]] == [start + 2 * day] and not rest["has_more"]
    only = report(store.engine, UsageQuery("completions", start, start + 3 * day, "1d", project_ids=("beta",)))
    assert [r["num_model_requests"] for b in only["data"] for r in b["results"]] == [2]


def test_a_full_usage_queue_drops_and_counts_and_a_stop_writes_the_rest(store):
    dropped = DROPPED._value.get()
    writer = UsageWriter(store, UsageSettings(flush_s=30, max_queued=3))
    for _ in range(5):
        writer.record(_record(time.time()))
    assert DROPPED._value.get() - dropped == 2

    async def stop_at_once() -> None:
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(stop_at_once())
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM mesh_usage")).scalar_one() == 3, \
            "a clean stop writes what was queued, long before the flush interval"


def test_bad_report_queries_are_refused(store):
    now = int(time.time())
    for bad in (UsageQuery("completions", now, bucket_width="2h"), UsageQuery("completions", now, group_by=("user",)),
                UsageQuery("costs", now, bucket_width="1h"), UsageQuery("completions", now, now - 10),
                UsageQuery("completions", now, limit=1000), UsageQuery("completions", now, page="x; DROP"),
                UsageQuery("audio", now)):
        with pytest.raises(MeshError) as refused:
            report(store.engine, bad)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_replicas_seeding_an_empty_database_at_once_seed_it_once(url):
    stores = [AdminStore.open(url) for _ in range(3)]
    wrote: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: wrote.append(s.import_config(SEED, only_if_empty=True)))
               for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(wrote) == [False, False, True]
    assert set(stores[0].snapshot()[1].tiers) == {"standard", "enterprise"}
    for store in stores:
        store.close()
