"""One typed settings object per service: defaults < YAML file < environment variables."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Literal

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from services.common.internal_tls import InternalTls
from services.common.resilience import ResilienceSettings


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the file named by `<PREFIX>CONFIG_FILE`, if set."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        if path:
            file = pathlib.Path(path)
            if not file.is_file():
                raise FileNotFoundError(f"settings file {file} does not exist")
            self._values = yaml.safe_load(file.read_text()) or {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class ServiceSettings(BaseSettings):
    """Base for each service's settings; subclasses set `env_prefix` (e.g. `MESH_GATEWAY_`)."""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = 0
    # Seconds that in-flight RPCs (streams included) get to finish after SIGTERM.
    shutdown_grace_s: float = 20.0
    # After SIGTERM, seconds of NOT_SERVING while still answering, so health checkers stop sending new work.
    drain_delay_s: float = 2.0
    log_level: str = "INFO"
    # The Prometheus endpoint on `host`; 0: none.
    metrics_port: int = 0
    # Circuit breakers and retries for the calls this service makes (e.g. MESH_GATEWAY_RESILIENCE__MAX_RETRIES).
    resilience: ResilienceSettings = ResilienceSettings()
    # mTLS with the other mesh processes (e.g. MESH_ROUTER_TLS__CERT); none: plaintext, loopback only.
    tls: InternalTls = InternalTls()
    # uvloop runs the event loop's callbacks in C: the hot path's profile is mostly event-loop machinery around
    # grpc.aio, not handler code (BENCHMARKS.md, issue 17). `asyncio`: the standard loop, for comparison.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        prefix = settings_cls.model_config.get("env_prefix", "")
        yaml_source = _YamlFileSource(settings_cls, os.environ.get(f"{prefix}CONFIG_FILE"))
        return init_settings, env_settings, yaml_source

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class RouterClientSettings(ServiceSettings):
    """For the services that ask the router for the model list (gateway, cache, retrieval): declared once. A
    subclass, not a mixin: a second BaseSettings base would bring its own config and undo ServiceSettings'
    nested-variable delimiter (MESH_CACHE_TLS__CERT would be ignored)."""

    router_address: str = "127.0.0.1:50052"
    # How often the model list is re-read: a registry reload reaches every caller within this.
    model_refresh_s: float = 5.0
