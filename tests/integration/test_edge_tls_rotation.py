"""The public certificate renewed under a running Envoy, as Kubernetes delivers a renewed Secret (cert-manager
writes the Secret; the kubelet swaps the mounted directory's `..data` link to a new timestamped directory): new
connections get the new certificate within seconds, with no restart. Read once at start (the config before SDS), an
expired certificate was an outage until someone restarted every edge pod."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

from services.edge.settings import EdgeSettings
from tools.edge import start_envoy, validate, write_config
from tools.pki import ensure_pki, issue_internal, make_ca
from tools.processes import free_port


def _atomic_write(directory: Path, files: dict[str, bytes], generation: int) -> None:
    """What the kubelet's AtomicWriter does for a Secret volume: the files in a new hidden directory, `..data`
    swapped to it by a rename, the visible names links through `..data`."""
    version = directory / f"..generation_{generation}"
    version.mkdir()
    for name, content in files.items():
        (version / name).write_bytes(content)
    staging = directory / "..data_tmp"
    staging.symlink_to(version.name)
    os.rename(staging, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


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


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, certificates):
    ca, issued = certificates
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cert, key = issued["edge-before"]
    _atomic_write(tls_dir, {"tls.crt": cert, "tls.key": key}, 1)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    pki = ensure_pki(tmp_path / "pki")
    settings = EdgeSettings(
        port=free_port(), admin_port=free_port(), metrics_port=free_port(),
        gateways=[f"127.0.0.1:{free_port()}"], gateways_http=[f"127.0.0.1:{free_port()}"],
        ratelimit_address=f"127.0.0.1:{free_port()}", edge_secret="rotation-test",
        tls_cert=str(tls_dir / "tls.crt"), tls_key=str(tls_dir / "tls.key"), jwks_file=str(pki.jwks),
        tls_sds_file=str(config_dir / "sds.yaml"))
    checked = validate(write_config(settings, tmp_path / "validate.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    envoy = start_envoy(settings, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            envoy.ensure_alive()
            try:
                assert _common_name(_served_certificate(settings.port, ca)) == "edge-before"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        cert, key = issued["edge-after"]
        _atomic_write(tls_dir, {"tls.crt": cert, "tls.key": key}, 2)
        renewed_at = time.monotonic()
        while _common_name(_served_certificate(settings.port, ca)) != "edge-after":
            envoy.ensure_alive()
            assert time.monotonic() - renewed_at < 10, "the renewed certificate was not served within 10 s"
            time.sleep(0.1)
    finally:
        envoy.stop()


def test_without_sds_the_certificate_is_read_once(tmp_path, certificates):
    """The same swap under the static config: the old certificate stays, which is what the SDS path fixes."""
    ca, issued = certificates
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cert, key = issued["edge-before"]
    _atomic_write(tls_dir, {"tls.crt": cert, "tls.key": key}, 1)
    pki = ensure_pki(tmp_path / "pki")
    settings = EdgeSettings(
        port=free_port(), admin_port=free_port(), metrics_port=free_port(),
        gateways=[f"127.0.0.1:{free_port()}"], gateways_http=[f"127.0.0.1:{free_port()}"],
        ratelimit_address=f"127.0.0.1:{free_port()}", edge_secret="rotation-test",
        tls_cert=str(tls_dir / "tls.crt"), tls_key=str(tls_dir / "tls.key"), jwks_file=str(pki.jwks))
    envoy = start_envoy(settings, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            envoy.ensure_alive()
            try:
                assert _common_name(_served_certificate(settings.port, ca)) == "edge-before"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        cert, key = issued["edge-after"]
        _atomic_write(tls_dir, {"tls.crt": cert, "tls.key": key}, 2)
        time.sleep(3)
        assert _common_name(_served_certificate(settings.port, ca)) == "edge-before"
    finally:
        envoy.stop()
