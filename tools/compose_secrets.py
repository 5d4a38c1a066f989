"""Makes compose/.env with fresh random secrets (edge secret, Redis, MinIO and the gateways' MinIO user, Grafana,
PostgreSQL) when it is absent, the PKI (CA, server and client certificates, JWT key) in run/pki, and a tenants file
with one tenant and a fresh API key (run/compose/tenants.yaml; the key is printed once and kept in compose/.env as
MESH_API_KEY). Compose refuses to start without them: nothing secret is committed or baked into an image, and the
development key of `make up` (config/tenants.yaml) is never what compose serves. Rotate by deleting them and running
it again.

    python -m tools.compose_secrets            # writes what is missing
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from pathlib import Path

import yaml

from tools.pki import ensure_pki

ROOT = Path(__file__).resolve().parent.parent
SECRET_NAMES = ("MESH_EDGE_SECRET", "REDIS_PASSWORD", "REDIS_GATEWAY_PASSWORD", "MINIO_ROOT_USER",
                "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "TRITON_HTTP_KEY", "POSTGRES_PASSWORD",
                "MESH_BATCH_S3_ACCESS_KEY", "MESH_BATCH_S3_SECRET_KEY")


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


def write_tenants(path: Path, env_file: Path, tiers_from: Path = ROOT / "config" / "tenants.yaml") -> str | None:
    """The first tenant of a compose deployment, `default` on the standard tier, with a new key (returned; None
    when the file exists). The file holds key hashes only: readable by the containers' user."""
    if path.exists():
        return None
    # services/common/tenants.py's format (not imported: gpu-smoke runs this without the services' packages).
    key = "mk_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    tiers = yaml.safe_load(tiers_from.read_text())["tiers"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Made by tools/compose_secrets.py. Add tenants with `python -m services.common.tenants`.\n"
                    + yaml.safe_dump({"tiers": tiers, "tenants": [
                        {"id": "default", "tier": "standard", "api_key_sha256": [digest]}]}, sort_keys=False))
    path.chmod(0o644)
    relative = os.path.relpath(path, env_file.parent)
    with env_file.open("a") as env:
        env.write(f"MESH_TENANTS_FILE={relative}\nMESH_API_KEY={key}\n")
    env_file.chmod(0o600)
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", type=Path, default=ROOT / "compose" / ".env")
    parser.add_argument("--pki", type=Path, default=ROOT / "run" / "pki")
    parser.add_argument("--tenants", type=Path, default=ROOT / "run" / "compose" / "tenants.yaml")
    args = parser.parse_args()
    print(("wrote " if write_env(args.env_file) else "kept ") + str(args.env_file))
    key = write_tenants(args.tenants, args.env_file)
    print(f"wrote {args.tenants}; tenant 'default' API key (also MESH_API_KEY in {args.env_file}): {key}" if key
          else f"kept {args.tenants}")
    ensure_pki(args.pki)
    print(f"PKI in {args.pki}")


if __name__ == "__main__":
    main()
