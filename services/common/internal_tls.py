"""mTLS between the mesh's own processes, and who may call whom.

Every internal certificate comes from the internal CA (tools/pki.py) and names one identity in its common name:
edge, gateway, router, cache, retrieval, ratelimit, triton, mesh-admin. A server accepts only peers with such a
certificate, and of those only the identities CALLERS names for it; the admin RPCs (drain, reload, flush) only
the admin identity. Without certificates a service speaks plaintext, which is allowed on loopback only, or
where `allow_plaintext` says so explicitly.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, model_validator

from services.common.errors import abort, denied
from services.common.handler_wrapping import HandlerInterceptor, Stream, Unary

ADMIN = "mesh-admin"
# The callers each server accepts, by the identity in their certificate, per method prefix ("": the rest of the
# server's methods). The admin identity may call anything.
CALLERS: dict[str, dict[str, frozenset[str]]] = {
    "gateway": {"": frozenset({"edge"})},
    "router": {"": frozenset({"gateway", "cache", "retrieval"})},
    "cache": {"": frozenset({"gateway"})},
    "retrieval": {"": frozenset({"gateway"})},
    # One process, two services: Envoy asks for rate-limit decisions, the gateways spend token budgets.
    "ratelimit": {"/envoy.service.ratelimit.v3.RateLimitService/": frozenset({"edge"}),
                  "/inference_mesh.v1.TokenBudget/": frozenset({"gateway"})},
}
# Calls that change how the mesh serves everyone: an admin's only.
ADMIN_METHODS = frozenset({
    "/inference_mesh.v1.RouterAdmin/DrainReplica",
    "/inference_mesh.v1.RouterAdmin/UndrainReplica",
    "/inference_mesh.v1.RouterAdmin/ReloadRegistry",
    "/inference_mesh.v1.CacheAdmin/Flush",
})
# Any verified peer may ask whether a server is up and what it serves (Envoy's, Docker's and the launcher's probes).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
LOOPBACK_HOSTS = {"localhost"}


class InternalTls(BaseModel):
    """This process's certificate (used as server and as client), its key, and the internal CA."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    # Plaintext off loopback must be asked for (e.g. a mesh behind a service mesh's sidecars that do mTLS).
    allow_plaintext: bool = False

    @model_validator(mode="after")
    def _all_or_none(self) -> InternalTls:
        given = [bool(self.cert), bool(self.key), bool(self.ca)]
        if any(given) and not all(given):
            raise ValueError("internal TLS needs cert, key and ca together (or none of them, for plaintext)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.key).read_bytes(), Path(self.cert).read_bytes(), Path(self.ca).read_bytes()

    def _files_version(self) -> tuple[tuple[int, int], ...]:
        # A Kubernetes Secret's renewal swaps the files behind their links: the resolved file's inode and mtime
        # change, which a stat sees without reading the key.
        stats = [Path(path).stat() for path in (self.key, self.cert, self.ca)]
        return tuple((s.st_ino, s.st_mtime_ns) for s in stats)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that read the files again when they change (cert-manager renewing the certificate, a
        replaced Secret): each new connection's handshake asks, and gets the renewed certificate and CA without
        a restart. Connections already open keep theirs (servers age them out: channels.MAX_CONNECTION_AGE_MS)."""
        key, cert, ca = self._read()
        served = {"version": self._files_version()}

        def renewed() -> grpc.ServerCertificateConfiguration | None:
            try:
                version = self._files_version()
                if version == served["version"]:
                    return None
                key, cert, ca = self._read()
            except OSError:
                return None  # mid-swap: keep serving the certificate it has
            served["version"] = version
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca), renewed,
            require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def ssl_server_context(self) -> ssl.SSLContext:
        """The same policy for an HTTP server: a certificate from the internal CA is required."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def check_listen_address(self, address: str) -> None:
        """Refuses to serve plaintext beyond loopback unless allow_plaintext says so."""
        if self.enabled or self.allow_plaintext:
            return
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host in LOOPBACK_HOSTS
        if not loopback:
            raise ValueError(f"refusing to serve plaintext on {address}: set the service's TLS__CERT, TLS__KEY and "
                             f"TLS__CA (python -m tools.pki init makes them), or TLS__ALLOW_PLAINTEXT=true")


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the peer's verified certificate; None over plaintext."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def peer_identity_of_certificate(certificate: dict | None) -> str | None:
    """The common name of a verified peer certificate as Python's ssl module gives it (getpeercert())."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def refusal(service: str, method: str, identity: str | None) -> str | None:
    """Why `identity` may not call `method` on `service`; None when it may."""
    if method.startswith(OPEN_PREFIXES) or identity == ADMIN:
        return None
    if method in ADMIN_METHODS:
        return f"{method} needs the {ADMIN} identity; the caller's certificate says {identity!r}"
    rules = CALLERS.get(service, {})
    allowed = next((who for prefix, who in rules.items() if prefix and method.startswith(prefix)),
                   rules.get("", frozenset()))
    if identity not in allowed:
        return f"{method} accepts calls from {sorted(allowed)} only; the caller's certificate says {identity!r}"
    return None


class CallerPolicy(HandlerInterceptor):
    """Applies `refusal` to every call on a server that requires client certificates."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    async def _check(self, method: str, context: grpc.aio.ServicerContext) -> None:
        why = refusal(self._service, method, peer_identity(context))
        if why:
            await abort(context, denied(why))

    def around_unary(self, inner: Unary, method: str) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(method, context)
            return await inner(request, context)
        return unary

    def around_stream(self, inner: Stream, method: str) -> Stream:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._check(method, context)
            async for response in inner(request, context):
                yield response
        return stream
