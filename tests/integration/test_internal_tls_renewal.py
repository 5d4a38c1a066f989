"""A mesh server's internal certificate renewed under it (cert-manager's Certificate renewing the identity's
Secret, which the kubelet swaps into the pod): the next connection's handshake presents the renewed certificate,
with no restart, through the same credentials every mesh server uses (InternalTls.server_credentials)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channels import channel
from services.common.internal_tls import InternalTls
from tests.integration.secret_volume import atomic_write
from tools.pki import ensure_pki, internal_ca, issue_internal
from tools.processes import free_port


def _served_serial(port: int, client: InternalTls) -> int:
    """The serial of the certificate a fresh TLS connection to the server is shown."""
    context = ssl.create_default_context(cafile=client.ca)
    context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


async def test_a_renewed_certificate_is_presented_on_the_next_connection_without_a_restart(tmp_path: Path):
    pki = ensure_pki(tmp_path / "pki")
    ca, ca_key = internal_ca(pki)
    ca_pem = pki.internal_ca.read_bytes()
    issued = [issue_internal("router", ("localhost",), ca, ca_key) for _ in range(2)]
    secret = tmp_path / "secret"
    atomic_write(secret, {"tls.crt": issued[0][0], "tls.key": issued[0][1], "ca.crt": ca_pem}, 1)
    tls = InternalTls(cert=str(secret / "tls.crt"), key=str(secret / "tls.key"), ca=str(secret / "ca.crt"))
    client = InternalTls(cert=str(pki.internal_cert("gateway")), key=str(pki.internal_key("gateway")),
                         ca=str(pki.internal_ca))

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port(f"127.0.0.1:{free_port()}", tls.server_credentials())
    await server.start()
    try:
        first, second = (x509.load_pem_x509_certificate(cert).serial_number for cert, _ in issued)
        async with channel(f"127.0.0.1:{port}", client, authority="localhost") as before:
            await health_pb2_grpc.HealthStub(before).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert _served_serial(port, client) == first
            atomic_write(secret, {"tls.crt": issued[1][0], "tls.key": issued[1][1], "ca.crt": ca_pem}, 2)
            assert _served_serial(port, client) == second
            # The connection opened before the renewal goes on serving calls.
            await health_pb2_grpc.HealthStub(before).Check(health_pb2.HealthCheckRequest(), timeout=5)
        async with channel(f"127.0.0.1:{port}", client, authority="localhost") as after:
            await health_pb2_grpc.HealthStub(after).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(None)
