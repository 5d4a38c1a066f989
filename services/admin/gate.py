"""Who may use the admin API: the mesh-admin certificate on a gateway's internal port, or a request relayed by
the edge (its shared secret) carrying a JWT that Envoy verified with the admin scope. A tenant's API key, or a
tenant's JWT, never: an admin credential is a different thing, not a bigger key."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from services.common.errors import denied, unauthenticated
from services.common.internal_tls import ADMIN
from services.common.wire import ADMIN_SCOPE, CREDENTIAL_HEADERS, EDGE_SECRET_HEADER, JWT_SCOPE_HEADER

HOW = (f"the admin API takes the {ADMIN} certificate, or through the edge a JWT whose scope holds {ADMIN_SCOPE!r} "
       "(python -m tools.admin token)")


class AdminGate:
    def __init__(self, edge_secret: str) -> None:
        self._edge_secret = edge_secret

    def admit(self, headers: Iterable[tuple[str, str | bytes]], peer: str | None) -> str:
        """The admin's name for the audit log, or a refusal that says what credential to bring."""
        if peer == ADMIN:
            return ADMIN
        seen = {key.lower(): value for key, value in headers if isinstance(value, str)}
        secret = seen.get(EDGE_SECRET_HEADER, "")
        from_edge = bool(self._edge_secret) and hmac.compare_digest(secret.encode(), self._edge_secret.encode())
        scopes = seen.get(JWT_SCOPE_HEADER, "").split() if from_edge else []
        if ADMIN_SCOPE in scopes:
            return "jwt"
        if from_edge and JWT_SCOPE_HEADER in seen:
            raise denied(f"this JWT's scope does not hold {ADMIN_SCOPE!r}: {HOW}")
        if any(header in seen for header in CREDENTIAL_HEADERS):
            raise denied(f"an API key is a tenant's credential, not an admin's: {HOW}")
        raise unauthenticated(f"no admin credential: {HOW}")
