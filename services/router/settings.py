from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_ROUTER_", extra="forbid")

    port: int = 50052
    registry_file: str = "config/registry.yaml"
    # A replica that stops answering leaves rotation within probe_interval_s + probe_timeout_s (< 10 s).
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 1.5
    # Upper bound for one inference call when the caller sets no deadline (seed guide: 30-60 s).
    default_timeout_s: float = 60.0
