"""The public certificate renewed under a running Envoy, as Kubernetes delivers a renewed Secret (cert-manager
writes the Secret; the kubelet swaps the mounted directory's `..data` link to a new timestamped directory): new
connections get the new certificate within seconds, with no restart. Read once at start (the config before SDS), an
expired certificate was an outage until someone restarted every edge pod."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

from services.edge.settings import EdgeSettings
from tests.integration.secret_volume import atomic_write
from tools.edge import start_envoy, validate, write_config
from tools.pki import ensure_pki, issue_internal, make_ca
from tools.processes import free_port


def _served_certificate(port: int, ca: Path) -> x509.Certificate:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def _common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


@pytest.fixture()
def certificates(tmp_path: Path):
    ca, ca_key = make_ca(tmp_path / "ca", "rotation test CA")
    issued = {name: issue_internal(name, ("localhost",), ca, ca_key) for name in ("edge-before", "edge-after")}
    return tmp_path / "ca" / "ca.pem", issued


def _edge(tmp_path: Path, issued: dict[str, tuple[bytes, bytes]], sds: bool) -> EdgeSettings:
    """Settings of an Envoy whose certificate sits in a Secret-like directory holding "edge-before"; nothing
    behind it (the TLS handshake is all these tests read)."""
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cert, key = issued["edge-before"]
    atomic_write(tls_dir, {"tls.crt": cert, "tls.key": key}, 1)
    (tmp_path / "config").mkdir()
    return EdgeSettings(
        port=free_port(), admin_port=free_port(), metrics_port=free_port(),
        gateways=[f"127.0.0.1:{free_port()}"], gateways_http=[f"127.0.0.1:{free_port()}"],
        ratelimit_address=f"127.0.0.1:{free_port()}", edge_secret="rotation-test",
        tls_cert=str(tls_dir / "tls.crt"), tls_key=str(tls_dir / "tls.key"),
        jwks_file=str(ensure_pki(tmp_path / "pki").jwks),
        tls_sds_dir=str(tmp_path / "config") if sds else "")


def _renew(settings: EdgeSettings, issued: dict[str, tuple[bytes, bytes]]) -> None:
    cert, key = issued["edge-after"]
    atomic_write(Path(settings.tls_cert).parent, {"tls.crt": cert, "tls.key": key}, 2)


def _wait_serving(envoy, settings: EdgeSettings, ca: Path, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        envoy.ensure_alive()
        try:
            return _common_name(_served_certificate(settings.port, ca))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, certificates):
    ca, issued = certificates
    settings = _edge(tmp_path, issued, sds=True)
    checked = validate(write_config(settings, tmp_path / "validate.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    envoy = start_envoy(settings, tmp_path)
    try:
        assert _wait_serving(envoy, settings, ca) == "edge-before"
        _renew(settings, issued)
        renewed_at = time.monotonic()
        while _wait_serving(envoy, settings, ca) != "edge-after":
            assert time.monotonic() - renewed_at < 10, "the renewed certificate was not served within 10 s"
            time.sleep(0.1)
    finally:
        envoy.stop()


def test_without_sds_the_certificate_is_read_once(tmp_path, certificates):
    """The same swap under the static config: the old certificate stays, which is what the SDS path fixes."""
    ca, issued = certificates
    settings = _edge(tmp_path, issued, sds=False)
    envoy = start_envoy(settings, tmp_path)
    try:
        assert _wait_serving(envoy, settings, ca) == "edge-before"
        _renew(settings, issued)
        time.sleep(3)
        assert _wait_serving(envoy, settings, ca) == "edge-before"
    finally:
        envoy.stop()
