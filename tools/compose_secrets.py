"""Makes compose/.env with fresh random secrets (edge secret, Redis, MinIO, Grafana) when it is absent, and the
PKI (CA, server and client certificates, JWT key) in run/pki. Compose refuses to start without them: nothing
secret is committed or baked into an image. Rotate by deleting compose/.env (and run/pki) and running it again.

    python -m tools.compose_secrets            # writes compose/.env and run/pki if missing
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from tools.pki import ensure_pki

ROOT = Path(__file__).resolve().parent.parent
SECRET_NAMES = ("MESH_EDGE_SECRET", "REDIS_PASSWORD", "REDIS_GATEWAY_PASSWORD", "MINIO_ROOT_USER",
                "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def new_secrets() -> dict[str, str]:
    return {name: secrets.token_urlsafe(32) for name in SECRET_NAMES}


def write_env(path: Path) -> bool:
    """True when the file was written or completed; an existing secret is kept (it is in use), a secret added
    since the file was made is appended."""
    existing = path.read_text() if path.exists() else ""
    have = {line.split("=", 1)[0] for line in existing.splitlines() if "=" in line}
    missing = {name: value for name, value in new_secrets().items() if name not in have}
    if not missing:
        return False
    prefix = existing if not existing or existing.endswith("\n") else existing + "\n"
    path.write_text(prefix + "".join(f"{name}={value}\n" for name, value in missing.items()))
    path.chmod(0o600)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", type=Path, default=ROOT / "compose" / ".env")
    parser.add_argument("--pki", type=Path, default=ROOT / "run" / "pki")
    args = parser.parse_args()
    print(("wrote " if write_env(args.env_file) else "kept ") + str(args.env_file))
    ensure_pki(args.pki)
    print(f"PKI in {args.pki}")


if __name__ == "__main__":
    main()
