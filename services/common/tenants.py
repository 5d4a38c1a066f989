"""Tenants and tiers from one YAML file; API keys are stored as SHA-256 hashes, never in clear."""

from __future__ import annotations

import hashlib
import pathlib
import secrets
from functools import cached_property

import yaml
from pydantic import BaseModel, Field


class Tier(BaseModel, extra="forbid"):
    # Enforced at the edge: Envoy asks the mesh's rate-limit service, a token bucket in Redis holding `burst`
    # requests refilled at the per-minute rate.
    requests_per_minute: int = Field(gt=0)
    burst: int = Field(gt=0)
    # Token budgets, charged with each generation's real usage (prompt + completion tokens); 0 = unlimited.
    tokens_per_minute: int = Field(default=0, ge=0)
    tokens_per_month: int = Field(default=0, ge=0)
    # Under overload (every replica of a model busy), waiting tenants are served in proportion to their tier's
    # weight, on token cost (services/router/admission.py).
    share_weight: float = Field(default=1.0, gt=0.0, le=100.0)
    # Storage: the vectors (one per chunk passage) a tenant may keep in the document index; 0 = unlimited.
    max_stored_vectors: int = Field(default=0, ge=0)
    # Batch inference: the share of the price that work at batch priority is not charged (0.5: half price, as
    # OpenAI's Batch API), because it waits for capacity interactive work leaves.
    batch_discount: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Files kept for batches and batches in flight at once; 0: the deployment's (MESH_GATEWAY_BATCH__MAX_FILES,
    # MESH_GATEWAY_BATCH__MAX_BATCHES_IN_FLIGHT).
    max_batch_files: int = Field(default=0, ge=0)
    max_batches_in_flight: int = Field(default=0, ge=0)


class ApiKey(BaseModel, extra="forbid"):
    """A key as the admin database keeps it (services/admin); the seed file may list bare hashes instead."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    id: str = ""
    prefix: str = ""
    expires_at: float | None = None      # unix seconds; refused from then on
    allowed_models: list[str] = Field(default_factory=list)  # empty: every model
    labels: dict[str, str] = Field(default_factory=dict)
    # The key's own limits, under its tier's; 0: the tier's alone. Requests at the edge, tokens by the budgets.
    requests_per_minute: int = Field(default=0, ge=0)
    burst: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    tokens_per_month: int = Field(default=0, ge=0)


class Tenant(BaseModel, extra="forbid"):
    # It becomes part of Redis keys, metric labels and headers: a plain name, never free text.
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    tier: str
    suspended: bool = False
    api_key_sha256: list[str] = Field(default_factory=list)
    keys: list[ApiKey] = Field(default_factory=list)

    def all_keys(self) -> list[ApiKey]:
        return self.keys + [ApiKey(sha256=digest) for digest in self.api_key_sha256]


class TenantConfig(BaseModel, extra="forbid"):
    tiers: dict[str, Tier]
    tenants: list[Tenant]

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    def key(self, key_id: str) -> tuple[Tenant, ApiKey] | None:
        return self._keys_by_id.get(key_id)

    @cached_property
    def _keys_by_id(self) -> dict[str, tuple[Tenant, ApiKey]]:
        return {key.id: (t, key) for t in self.tenants for key in t.keys if key.id}

    @cached_property
    def _by_id(self) -> dict[str, Tenant]:
        # Asked per request by the budget service: a table from the database may hold thousands of tenants.
        return {t.id: t for t in self.tenants}

    def tenant_by_key_hash(self) -> dict[str, Tenant]:
        return {key.sha256: t for t in self.tenants for key in t.all_keys()}

    @classmethod
    def load(cls, path: str | pathlib.Path) -> TenantConfig:
        config = cls.model_validate(yaml.safe_load(pathlib.Path(path).read_text()))
        for tenant in config.tenants:
            if tenant.tier not in config.tiers:
                raise ValueError(f"tenant {tenant.id!r} has unknown tier {tenant.tier!r}")
        return config


def hash_key(api_key: str) -> str:
    # API keys are 256-bit random tokens, so a fast hash is enough; a slow KDF would only cost latency.
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    key = "mk_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


if __name__ == "__main__":
    plain, digest = new_key()
    print(f"api key (give to the tenant): {plain}\napi_key_sha256 (put in tenants.yaml): {digest}")
