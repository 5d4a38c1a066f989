"""An S3-compatible server on loopback for tests: moto's S3 (`moto.server`), which answers the S3 REST API the
gateway's boto3 client speaks. Production and compose point the same client at AWS S3 or MinIO."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tools.processes import ManagedProcess, MissingPartError, free_port, wait_http_ok

# moto takes any key pair; these only keep boto3 from looking for real ones (or an instance role) on the host.
ACCESS_KEY = "mesh-test-access"
SECRET_KEY = "mesh-test-secret"


@dataclass
class S3Server:
    process: ManagedProcess
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gateway_env(self, bucket: str, create_bucket: bool = True) -> dict[str, str]:
        """A gateway's environment for batch files in `bucket` on this server."""
        return {"MESH_GATEWAY_BATCH__STORAGE": "s3", "MESH_GATEWAY_BATCH__S3__ENDPOINT_URL": self.endpoint,
                "MESH_GATEWAY_BATCH__S3__BUCKET": bucket,
                "MESH_GATEWAY_BATCH__S3__CREATE_BUCKET": str(create_bucket).lower(),
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def stop(self) -> None:
        self.process.stop(timeout_s=5)


def start_s3_server(log_path: Path, timeout_s: float = 60.0) -> S3Server:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise MissingPartError("moto's S3 server is missing: `make setup` installs it (requirements/services.txt)") \
            from None
    port = free_port()
    process = ManagedProcess("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log_path)
    server = S3Server(process, port)
    try:
        wait_http_ok(f"{server.endpoint}/moto-api/", process, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
