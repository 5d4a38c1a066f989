"""The one credential a request carries, read the same way by every service that reads one.

Metadata is a list: a header may come twice, and a key may come beside a JWT. A service that took the first
value and another that took the last would decide on different tenants for one request, so more than one
credential is refused outright (Envoy refuses it at the edge too: services/edge/render.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.wire import CREDENTIAL_HEADERS

MAX_CREDENTIAL_CHARS = 8_192
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class CredentialError(ValueError):
    """Why no single credential could be read; the text is for the caller."""


@dataclass(frozen=True)
class Credential:
    header: str
    # The API key or JWT itself, without the `Bearer ` scheme.
    token: str


def single_credential(metadata: Iterable[tuple[str, str | bytes]] | None) -> Credential:
    found = [(key.lower(), value) for key, value in (metadata or ()) if key.lower() in CREDENTIAL_HEADERS]
    if not found:
        raise CredentialError("missing credentials: send metadata 'authorization: Bearer <API key or JWT>' "
                              "or 'x-api-key: <key>'")
    if len(found) > 1:
        names = ", ".join(sorted({name for name, _ in found}))
        raise CredentialError(f"send exactly one credential; this request carried {len(found)} ({names})")
    header, value = found[0]
    if not isinstance(value, str) or len(value) > MAX_CREDENTIAL_CHARS:
        raise CredentialError(f"{header} must be text of at most {MAX_CREDENTIAL_CHARS} characters")
    if header == "authorization":
        if value[:7].lower() != "bearer ":
            raise CredentialError("authorization must be 'Bearer <API key or JWT>'")
        value = value[7:]
    # Keys and JWTs are visible ASCII. Anything else is refused, never trimmed: str.strip() removed a trailing
    # U+00A0 from "key\xa0" (an HTTP header read as latin-1), so a key the rate-limit service could not read as
    # a descriptor (it failed open) was accepted here as the clean key.
    token = value.strip(" ")
    if not token or "," in token:
        raise CredentialError(f"{header} holds no single credential")
    if not _VISIBLE_ASCII.fullmatch(token):
        raise CredentialError(f"{header} must be visible ASCII characters only (a key or a JWT, no spaces or "
                              "other bytes)")
    return Credential(header, token)
