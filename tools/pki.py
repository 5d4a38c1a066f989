"""A local CA, the edge's server certificate, a client certificate (mTLS) and a JWT signing key with its JWKS;
and a separate internal CA with one certificate per mesh identity (services/common/internal_tls.py), so that a
public client's certificate never passes for a service's.

`make up` and the tests create them when absent. Production brings its own: point the edge settings at them.
    python -m tools.pki mint --tenant dev        # a JWT for tenant dev, signed with the local key
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "run" / "pki"
JWT_ISSUER = "https://inference-mesh.local"
JWT_AUDIENCE = "inference-mesh"
JWT_KEY_ID = "mesh-local-1"
# One certificate each; the common name is the identity the services' caller policy reads.
INTERNAL_IDENTITIES = ("edge", "gateway", "router", "cache", "retrieval", "ratelimit", "triton", "mesh-admin")
# The host names each identity serves under in compose: up to three replicas (gateway-1..3), and Triton per pool.
REPLICA_HOST_SUFFIXES = ("", "-1", "-2", "-3")
EXTRA_HOSTS = {"triton": ("triton-cpu", "triton-a100", "triton-t4")}


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca_cert(self) -> Path:
        return self.path("ca.pem")

    @property
    def server_cert(self) -> Path:
        return self.path("server.pem")

    @property
    def server_key(self) -> Path:
        return self.path("server-key.pem")

    @property
    def client_cert(self) -> Path:
        return self.path("client.pem")

    @property
    def client_key(self) -> Path:
        return self.path("client-key.pem")

    @property
    def jwt_key(self) -> Path:
        return self.path("jwt-signing-key.pem")

    @property
    def jwks(self) -> Path:
        return self.path("jwks.json")

    @property
    def internal_ca(self) -> Path:
        return self.path("internal-ca.pem")

    def internal_cert(self, identity: str) -> Path:
        return self.path(f"internal-{identity}.pem")

    def internal_key(self, identity: str) -> Path:
        return self.path(f"internal-{identity}-key.pem")


def _new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    # Internal hops: P-256 handshakes cost a fraction of RSA-2048's, and the keys are made in milliseconds.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: PrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _load_key(path: Path) -> PrivateKey:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _certificate(subject: str, key: PrivateKey, issuer: x509.Certificate | None,
                 issuer_key: PrivateKey, *, ca: bool = False, server: bool = False,
                 client: bool = False, hosts: tuple[str, ...] = (), days: int = 825) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "inference-mesh (local)")])
    now = dt.datetime.now(dt.timezone.utc)  # noqa: UP017 - dt.UTC is 3.11+; gpu-smoke hosts may run 3.10
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client or not server else []
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        names = [x509.DNSName(host) for host in (*hosts, "localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [*names, x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(directory: Path, name: str = "inference-mesh local CA", file: str = "ca",
            key: PrivateKey | None = None) -> tuple[x509.Certificate, PrivateKey]:
    directory.mkdir(parents=True, exist_ok=True)
    key = key or _new_key()
    cert = _certificate(name, key, None, key, ca=True, days=3650)
    (directory / f"{file}.pem").write_bytes(_pem(cert))
    _write_key(key, directory / f"{file}-key.pem")
    return cert, key


def _ensure_internal(pki: Pki) -> None:
    if not pki.internal_ca.exists():
        ca, ca_key = make_ca(pki.directory, "inference-mesh internal CA", "internal-ca", _new_ec_key())
        for identity in INTERNAL_IDENTITIES:
            pki.internal_cert(identity).unlink(missing_ok=True)
    else:
        ca, ca_key = internal_ca(pki)
    for identity in INTERNAL_IDENTITIES:
        if pki.internal_cert(identity).exists():
            continue
        hosts = (*(f"{identity}{suffix}" for suffix in REPLICA_HOST_SUFFIXES), *EXTRA_HOSTS.get(identity, ()))
        cert, key = issue_internal(identity, hosts, ca, ca_key)
        pki.internal_cert(identity).write_bytes(cert)
        pki.internal_key(identity).write_bytes(key)
        pki.internal_key(identity).chmod(0o600)


def issue_internal(identity: str, hosts: tuple[str, ...], ca: x509.Certificate,
                   ca_key: PrivateKey) -> tuple[bytes, bytes]:
    """A fresh key and its certificate (PEM) for one mesh identity, valid as server under `hosts` and as client."""
    key = _new_ec_key()
    cert = _certificate(identity, key, ca, ca_key, server=True, client=True, hosts=hosts)
    return _pem(cert), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())


def internal_ca(pki: Pki) -> tuple[x509.Certificate, PrivateKey]:
    """The internal CA's certificate and key (ensure_pki makes them where absent)."""
    return (x509.load_pem_x509_certificate(pki.internal_ca.read_bytes()),
            _load_key(pki.path("internal-ca-key.pem")))


def ensure_pki(directory: Path = DEFAULT_DIR) -> Pki:
    """Creates whatever is missing; never replaces what exists (a CA clients already trust stays)."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not pki.ca_cert.exists():
        ca, ca_key = make_ca(directory)
        for stale in (pki.server_cert, pki.client_cert):
            stale.unlink(missing_ok=True)
    else:
        ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        ca_key = _load_key(pki.path("ca-key.pem"))
    if not pki.server_cert.exists():
        key = _new_key()
        pki.server_cert.write_bytes(_pem(_certificate("localhost", key, ca, ca_key, server=True)))
        _write_key(key, pki.server_key)
    if not pki.client_cert.exists():
        key = _new_key()
        pki.client_cert.write_bytes(_pem(_certificate("mesh-client", key, ca, ca_key)))
        _write_key(key, pki.client_key)
    if not pki.jwt_key.exists():
        _write_key(_new_key(), pki.jwt_key)
        pki.jwks.unlink(missing_ok=True)
    if not pki.jwks.exists():
        pki.jwks.write_text(json.dumps(jwks_for(_load_key(pki.jwt_key))))
    _ensure_internal(pki)
    return pki


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwks_for(key: rsa.RSAPrivateKey, kid: str = JWT_KEY_ID) -> dict:
    numbers = key.public_key().public_numbers()
    return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                      "n": _b64(numbers.n), "e": _b64(numbers.e)}]}


def mint_jwt(pki: Pki, tenant: str, ttl_s: float = 3600, *, key_path: Path | None = None,
             issuer: str = JWT_ISSUER, audience: str = JWT_AUDIENCE, issued_at: float | None = None) -> str:
    now = issued_at if issued_at is not None else time.time()
    claims = {"iss": issuer, "aud": audience, "sub": f"client-of-{tenant}", "tenant": tenant,
              "iat": int(now), "exp": int(now + ttl_s)}
    key = (key_path or pki.jwt_key).read_bytes()
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": JWT_KEY_ID})


def mint_admin_jwt(pki: Pki, subject: str, ttl_s: float = 3600, scope: str = "") -> str:
    """A JWT for the admin API through the edge: no tenant, the admin scope (services/admin/gate.py)."""
    # Imported here: gpu-smoke's small environment runs this module without the services on its path.
    from services.common.wire import ADMIN_SCOPE

    scope = scope or ADMIN_SCOPE
    now = time.time()
    claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": subject, "scope": scope,
              "iat": int(now), "exp": int(now + ttl_s)}
    return jwt.encode(claims, pki.jwt_key.read_bytes(), algorithm="RS256", headers={"kid": JWT_KEY_ID})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.pki", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="create the CA, certificates and JWT key where missing")
    mint = commands.add_parser("mint", help="print a JWT for a tenant")
    mint.add_argument("--tenant", required=True)
    mint.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    args = parser.parse_args()
    pki = ensure_pki(args.dir)
    if args.command == "mint":
        print(mint_jwt(pki, args.tenant, args.ttl))
    else:
        print(f"certificates and JWKS in {pki.directory}")


if __name__ == "__main__":
    main()
