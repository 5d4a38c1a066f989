"""`python -m services.common.healthcheck HOST:PORT [CERT KEY CA]`: exit 0 when the gRPC server there is SERVING
(grpc.health.v1), 1 otherwise. The containers' healthcheck, so the images need no separate probe binary. With
a certificate, key and CA it speaks mTLS (a service probing itself presents its own certificate)."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.internal_tls import InternalTls

# Docker's healthcheck runs every few seconds; a server that cannot answer a health check in this long is not healthy.
CHECK_TIMEOUT_S = 3.0


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    tls = InternalTls(**dict(zip(("cert", "key", "ca"), sys.argv[2:5], strict=False)))
    try:
        with (grpc.secure_channel(address, tls.channel_credentials()) if tls.enabled
              else grpc.insecure_channel(address)) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
    except grpc.RpcError as exc:
        sys.exit(f"{address}: {exc.code().name}")
    sys.exit(0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1)


if __name__ == "__main__":
    main()
