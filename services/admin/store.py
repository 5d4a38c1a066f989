"""Tiers, tenants and API keys in the admin database: every write checked before anything is written, one
transaction each, and the revision bumped with it so every replica's poll sees the change. Synchronous (the
admin plane's rate is people's): async callers run it in a thread."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from inference_mesh.v1 import admin_pb2
from services.admin import schema
from services.admin.database import admin_engine
from services.admin.migrations import migrate
from services.common.errors import already_exists, failed_precondition, invalid, not_found
from services.common.tenants import ApiKey, Tenant, TenantConfig, Tier, hash_key

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_LABELS = 16
MAX_LABEL_VALUE = 256
MAX_MODELS = 64
MAX_OVERLAP_S = 30 * 86400
# What a list shows of a secret ("mk_" and 7 characters): enough to find a leaked key, far too little to use it.
PREFIX_CHARS = 10
SECRET_PREFIX = "mk_"
SEED_LOCK_ID = 0x6D657369  # beside migrations' lock id: the same in every replica


def _name(kind: str, value: str) -> str:
    if not NAME.match(value):
        raise invalid(f"{kind} {value!r} is not a valid name: 1-64 letters, digits, '_', '.' or '-', starting "
                      "with a letter or digit")
    return value


def _models(models: Iterable[str]) -> list[str]:
    models = list(models)
    if len(models) > MAX_MODELS:
        raise invalid(f"allowed_models: at most {MAX_MODELS} models, got {len(models)}")
    for model in models:
        if not MODEL_NAME.match(model):
            raise invalid(f"allowed_models: {model[:80]!r} is not a model name")
    return sorted(set(models))


def _labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise invalid(f"labels: at most {MAX_LABELS}, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise invalid(f"label name {key[:80]!r}: 1-63 lower-case letters, digits, '_', '.' or '-'")
        if len(value) > MAX_LABEL_VALUE:
            raise invalid(f"label {key!r}: its value is {len(value)} characters, at most {MAX_LABEL_VALUE}")
        if not value.isprintable():
            raise invalid(f"label {key!r}: its value holds control characters")
    return dict(sorted(labels.items()))


def _tier_row(tier: admin_pb2.AdminTier) -> dict[str, Any]:
    _name("tier", tier.name)
    weight = tier.share_weight or 1.0
    # The same rules as the YAML's (services/common/tenants.Tier), so an import never meets a row it refuses.
    try:
        checked = Tier(**{**_tier_fields(tier), "share_weight": weight})
    except ValueError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())  # type: ignore[attr-defined]
        raise invalid(f"tier {tier.name!r}: {problems}") from None
    return {"name": tier.name, **checked.model_dump()}


def _tier_fields(source: Any) -> dict[str, Any]:
    """A Tier's fields, read off a proto, a row or anything else that has them by the same names: the YAML's
    Tier, the admin API's AdminTier and the mesh_tiers columns agree name for name."""
    return {name: getattr(source, name) for name in Tier.model_fields}


def _tier(row: Any) -> admin_pb2.AdminTier:
    return admin_pb2.AdminTier(name=row.name, **_tier_fields(row))


def _tenant(row: Any) -> admin_pb2.AdminTenant:
    return admin_pb2.AdminTenant(id=row.id, tier=row.tier, suspended=row.suspended, created_at=row.created_at)


def _key(row: Any) -> admin_pb2.AdminKey:
    return admin_pb2.AdminKey(id=row.id, tenant=row.tenant, prefix=row.prefix, created_at=row.created_at,
                              expires_at=row.expires_at or 0.0, revoked_at=row.revoked_at or 0.0,
                              allowed_models=json.loads(row.allowed_models), labels=json.loads(row.labels),
                              requests_per_minute=row.requests_per_minute or 0, burst=row.burst or 0,
                              tokens_per_minute=row.tokens_per_minute or 0, tokens_per_month=row.tokens_per_month or 0)


KeyLimits = tuple[int | None, int | None, int | None, int | None]
NO_KEY_LIMITS: KeyLimits = (None, None, None, None)


def _key_limits(tier: Any, requests_per_minute: int = 0, burst: int = 0, tokens_per_minute: int = 0,
                tokens_per_month: int = 0) -> KeyLimits:
    """A key's own limits, each checked to sit under its tier's; None where the tier's alone applies."""
    if bool(requests_per_minute) != bool(burst):
        raise invalid("a key's request limit needs both requests_per_minute and burst (or neither)")
    if requests_per_minute and (requests_per_minute > tier.requests_per_minute or burst > tier.burst):
        raise invalid(f"a key's request limit must be under its tier's ({tier.name}: {tier.requests_per_minute} "
                      f"requests/min, burst {tier.burst}); got {requests_per_minute}/min, burst {burst}")
    for name, own, tiers in (("tokens_per_minute", tokens_per_minute, tier.tokens_per_minute),
                             ("tokens_per_month", tokens_per_month, tier.tokens_per_month)):
        if own and tiers and own > tiers:
            raise invalid(f"a key's {name} must be under its tier's ({tier.name}: {tiers}); got {own}")
    return requests_per_minute or None, burst or None, tokens_per_minute or None, tokens_per_month or None


class AdminStore:
    def __init__(self, engine: Engine, clock=time.time) -> None:
        self._engine = engine
        self._clock = clock

    @classmethod
    def open(cls, url: str) -> AdminStore:
        """The store at `url`, its schema brought up to date first."""
        engine = admin_engine(url)
        migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    @property
    def engine(self) -> Engine:
        """For the usage writer and reports (services/admin/usage*.py), which share this store's connections."""
        return self._engine

    # --- what every replica polls ------------------------------------------------------------------------
    def revision(self) -> int:
        with self._engine.connect() as connection:
            return connection.execute(select(schema.revision.c.value).where(schema.revision.c.id == 1)).scalar_one()

    def snapshot(self) -> tuple[int, TenantConfig]:
        """The revision and everything a gateway or rate-limit replica serves from, read in one transaction.
        Revoked keys are left out; expired ones stay in (with their time) so the refusal can say so."""
        with self._engine.begin() as connection:
            rev = connection.execute(select(schema.revision.c.value).where(schema.revision.c.id == 1)).scalar_one()
            tiers = {row.name: Tier(**_tier_fields(row)) for row in connection.execute(select(schema.tiers))}
            keys: dict[str, list[ApiKey]] = {}
            live = select(schema.api_keys).where(schema.api_keys.c.revoked_at.is_(None))
            for row in connection.execute(live):
                keys.setdefault(row.tenant, []).append(
                    ApiKey(sha256=row.sha256, id=row.id, prefix=row.prefix, expires_at=row.expires_at,
                           allowed_models=json.loads(row.allowed_models), labels=json.loads(row.labels),
                           requests_per_minute=row.requests_per_minute or 0, burst=row.burst or 0,
                           tokens_per_minute=row.tokens_per_minute or 0, tokens_per_month=row.tokens_per_month or 0))
            tenants = [Tenant(id=row.id, tier=row.tier, suspended=row.suspended, keys=keys.get(row.id, []))
                       for row in connection.execute(select(schema.tenants).order_by(schema.tenants.c.id))]
        return rev, TenantConfig(tiers=tiers, tenants=tenants)

    # --- tiers ------------------------------------------------------------------------------------------------
    def list_tiers(self) -> list[admin_pb2.AdminTier]:
        with self._engine.connect() as connection:
            return [_tier(row) for row in connection.execute(select(schema.tiers).order_by(schema.tiers.c.name))]

    def put_tier(self, tier: admin_pb2.AdminTier) -> admin_pb2.AdminTier:
        row = _tier_row(tier)
        with self._engine.begin() as connection:
            found = connection.execute(update(schema.tiers).where(schema.tiers.c.name == tier.name).values(**row))
            if not found.rowcount:
                connection.execute(insert(schema.tiers).values(**row))
            self._bump(connection)
        return _tier(SimpleNamespace(**row))

    # --- tenants ----------------------------------------------------------------------------------------------
    def create_tenant(self, tenant_id: str, tier: str) -> admin_pb2.AdminTenant:
        _name("tenant", tenant_id)
        row = {"id": tenant_id, "tier": tier, "suspended": False, "created_at": self._clock()}
        with self._engine.begin() as connection:
            self._require_tier(connection, tier)
            if connection.execute(select(schema.tenants.c.id).where(schema.tenants.c.id == tenant_id)).first():
                raise already_exists(f"tenant {tenant_id!r} already exists")
            try:
                connection.execute(insert(schema.tenants).values(**row))
            except IntegrityError:
                raise already_exists(f"tenant {tenant_id!r} already exists") from None
            self._bump(connection)
        return _tenant(SimpleNamespace(**row))

    def list_tenants(self) -> list[admin_pb2.AdminTenant]:
        with self._engine.connect() as connection:
            return [_tenant(row) for row in
                    connection.execute(select(schema.tenants).order_by(schema.tenants.c.id))]

    def update_tenant(self, tenant_id: str, tier: str | None = None,
                      suspended: bool | None = None) -> admin_pb2.AdminTenant:
        changes: dict[str, Any] = {}
        with self._engine.begin() as connection:
            if tier is not None:
                self._require_tier(connection, tier)
                changes["tier"] = tier
            if suspended is not None:
                changes["suspended"] = suspended
            if not changes:
                raise invalid("nothing to change: give a tier, suspended, or both")
            found = connection.execute(
                update(schema.tenants).where(schema.tenants.c.id == tenant_id).values(**changes))
            if not found.rowcount:
                raise not_found(f"no tenant {tenant_id[:80]!r}")
            self._bump(connection)
            row = connection.execute(select(schema.tenants).where(schema.tenants.c.id == tenant_id)).one()
        return _tenant(row)

    # --- keys -------------------------------------------------------------------------------------------------
    def create_key(self, tenant: str, expires_at: float = 0.0, allowed_models: Iterable[str] = (),
                   labels: dict[str, str] | None = None, requests_per_minute: int = 0, burst: int = 0,
                   tokens_per_minute: int = 0, tokens_per_month: int = 0) -> tuple[admin_pb2.AdminKey, str]:
        models, checked_labels = _models(allowed_models), _labels(dict(labels or {}))
        now = self._clock()
        if expires_at and expires_at <= now:
            raise invalid(f"expires_at {expires_at:.0f} is in the past (now {now:.0f}); 0 means never")
        with self._engine.begin() as connection:
            found = connection.execute(
                select(schema.tiers).join(schema.tenants, schema.tenants.c.tier == schema.tiers.c.name)
                .where(schema.tenants.c.id == tenant)).first()
            if found is None:
                raise not_found(f"no tenant {tenant[:80]!r}")
            limits = _key_limits(found, requests_per_minute, burst, tokens_per_minute, tokens_per_month)
            key, secret = self._insert_key(connection, tenant, expires_at or None, models, checked_labels, now,
                                           limits)
            self._bump(connection)
        return key, secret

    def list_keys(self, tenant: str = "", prefix: str = "",
                  include_revoked: bool = False) -> list[admin_pb2.AdminKey]:
        query = select(schema.api_keys).order_by(schema.api_keys.c.tenant, schema.api_keys.c.created_at)
        if tenant:
            query = query.where(schema.api_keys.c.tenant == tenant)
        if prefix and (len(prefix) > 64 or not prefix.isascii() or not prefix.isprintable()):
            raise invalid("prefix: the first characters of a key (printable ASCII, at most 64)")
        if not include_revoked:
            query = query.where(schema.api_keys.c.revoked_at.is_(None))
        with self._engine.connect() as connection:
            rows = list(connection.execute(query))
        # Compared here, not in SQL: a caller's string never becomes a LIKE pattern. Only the stored prefix can
        # be compared, so a longer string (a whole leaked key) matches on its first characters.
        return [_key(row) for row in rows if row.prefix.startswith(prefix[:PREFIX_CHARS])]

    def rotate_key(self, key_id: str, overlap_s: float) -> tuple[admin_pb2.AdminKey, str]:
        if not 0 <= overlap_s <= MAX_OVERLAP_S:
            raise invalid(f"overlap_s must be between 0 and {MAX_OVERLAP_S} seconds (30 days), got {overlap_s}")
        now = self._clock()
        with self._engine.begin() as connection:
            old = self._live_key(connection, key_id)
            ends = now + overlap_s
            if old.expires_at is not None:
                ends = min(ends, old.expires_at)
            changes = {"expires_at": ends} if overlap_s else {"revoked_at": now}
            connection.execute(update(schema.api_keys).where(schema.api_keys.c.id == key_id).values(**changes))
            key, secret = self._insert_key(connection, old.tenant, old.expires_at, json.loads(old.allowed_models),
                                           json.loads(old.labels), now, (old.requests_per_minute, old.burst,
                                                                         old.tokens_per_minute, old.tokens_per_month))
            self._bump(connection)
        return key, secret

    def revoke_key(self, key_id: str) -> admin_pb2.AdminKey:
        with self._engine.begin() as connection:
            self._live_key(connection, key_id)
            connection.execute(update(schema.api_keys).where(schema.api_keys.c.id == key_id)
                               .values(revoked_at=self._clock()))
            self._bump(connection)
            row = connection.execute(select(schema.api_keys).where(schema.api_keys.c.id == key_id)).one()
        return _key(row)

    # --- the seed file ----------------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        with self._engine.connect() as connection:
            return not connection.execute(select(func.count()).select_from(schema.tiers)).scalar_one()

    def import_config(self, config: TenantConfig, only_if_empty: bool = False) -> bool:
        """Tiers, tenants and key hashes from a TenantConfig (tenants.yaml) in one transaction: tiers are
        replaced, tenants and keys added or updated; nothing is deleted. With only_if_empty, a database that
        already holds tiers is left alone (several replicas seeding at once: one does it). Whether it wrote."""
        now = self._clock()
        with self._engine.begin() as connection:
            if self._engine.dialect.name == "postgresql":
                # Replicas starting together on an empty database: one seeds, the others then find its tiers
                # (SQLite's transactions already take the write lock at their start).
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SEED_LOCK_ID})
            if only_if_empty and connection.execute(select(func.count()).select_from(schema.tiers)).scalar_one():
                return False
            for name, tier in config.tiers.items():
                row = _tier_row(admin_pb2.AdminTier(name=name, **tier.model_dump()))
                if not connection.execute(update(schema.tiers).where(schema.tiers.c.name == name)
                                          .values(**row)).rowcount:
                    connection.execute(insert(schema.tiers).values(**row))
            for tenant in config.tenants:
                if tenant.tier not in config.tiers:
                    self._require_tier(connection, tenant.tier)
                values = {"tier": tenant.tier, "suspended": tenant.suspended}
                if not connection.execute(update(schema.tenants).where(schema.tenants.c.id == tenant.id)
                                          .values(**values)).rowcount:
                    connection.execute(insert(schema.tenants).values(id=tenant.id, created_at=now, **values))
                for key in tenant.all_keys():
                    row = {"tenant": tenant.id, "expires_at": key.expires_at,
                           "allowed_models": json.dumps(_models(key.allowed_models)),
                           "labels": json.dumps(_labels(key.labels)),
                           "requests_per_minute": key.requests_per_minute or None, "burst": key.burst or None,
                           "tokens_per_minute": key.tokens_per_minute or None,
                           "tokens_per_month": key.tokens_per_month or None}
                    if not connection.execute(update(schema.api_keys).where(schema.api_keys.c.sha256 == key.sha256)
                                              .values(**row)).rowcount:
                        connection.execute(insert(schema.api_keys).values(
                            id=key.id or "key_" + key.sha256[:16], prefix=key.prefix, sha256=key.sha256,
                            created_at=now, revoked_at=None, **row))
            self._bump(connection)
        return True

    def export_config(self) -> TenantConfig:
        """What import_config takes back: the seed file for a fresh database, or a GitOps repository's copy."""
        return self.snapshot()[1]

    # --- inside a transaction ---------------------------------------------------------------------------------
    def _bump(self, connection: Connection) -> None:
        connection.execute(update(schema.revision).where(schema.revision.c.id == 1)
                           .values(value=schema.revision.c.value + 1))

    def _require_tier(self, connection: Connection, tier: str) -> None:
        names = [row.name for row in connection.execute(select(schema.tiers.c.name).order_by(schema.tiers.c.name))]
        if tier not in names:
            raise invalid(f"unknown tier {tier[:80]!r}; the tiers are: {', '.join(names) or 'none yet'}")

    def _live_key(self, connection: Connection, key_id: str) -> Any:
        row = connection.execute(select(schema.api_keys).where(schema.api_keys.c.id == key_id)).first()
        if row is None:
            raise not_found(f"no key {key_id[:80]!r}")
        if row.revoked_at is not None:
            raise failed_precondition(f"key {key_id!r} was revoked at {row.revoked_at:.0f}")
        return row

    def _insert_key(self, connection: Connection, tenant: str, expires_at: float | None, models: list[str],
                    labels: dict[str, str], now: float,
                    limits: KeyLimits = NO_KEY_LIMITS) -> tuple[admin_pb2.AdminKey, str]:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        row = {"id": "key_" + secrets.token_hex(8), "tenant": tenant, "prefix": secret[:PREFIX_CHARS],
               "sha256": hash_key(secret), "created_at": now, "expires_at": expires_at, "revoked_at": None,
               "allowed_models": json.dumps(models), "labels": json.dumps(labels),
               "requests_per_minute": limits[0], "burst": limits[1], "tokens_per_minute": limits[2],
               "tokens_per_month": limits[3]}
        connection.execute(insert(schema.api_keys).values(**row))
        return _key(SimpleNamespace(**row)), secret
