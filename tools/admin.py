"""The admin plane from a terminal: tiers, tenants and keys straight in the admin database (the replicas pick a
change up within their poll interval), the seed file in and out, and an admin JWT for the edge's admin API.

    python -m tools.admin import config/tenants.yaml        # tiers, tenants, key hashes (adds or updates)
    python -m tools.admin export > tenants.yaml              # what import takes back (GitOps)
    python -m tools.admin tenants create acme --tier standard
    python -m tools.admin tenants update acme --suspend      # or --resume, --tier enterprise
    python -m tools.admin keys create acme --model smollm2 --label team=search --expires-in 30d
    python -m tools.admin keys list --prefix mk_AbC12        # find a leaked key by its first characters
    python -m tools.admin keys rotate key_0123 --overlap 1h
    python -m tools.admin keys revoke key_0123
    python -m tools.admin token                              # an admin JWT for /admin/v1 and Admin/* at the edge
    python -m tools.admin usage completions --since 7d --group-by model --group-by project_id
    python -m tools.admin usage costs --since 30d --group-by project_id

--db (or MESH_ADMIN_DB_URL) names the database; the default is `make up`'s SQLite file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml
from google.protobuf import json_format

from inference_mesh.v1 import admin_pb2
from services.admin.store import AdminStore
from services.admin.usage_reports import UsageQuery, report
from services.common.errors import MeshError
from services.common.tenants import TenantConfig

DEFAULT_DB = "sqlite:///run/admin.sqlite3"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90, 15m, 1h or 30d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: a label is name=value")
    return name, value


def _show(message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.admin", description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=os.environ.get("MESH_ADMIN_DB_URL", DEFAULT_DB))
    commands = parser.add_subparsers(dest="command", required=True)
    imported = commands.add_parser("import", help="tiers, tenants and key hashes from a tenants.yaml")
    imported.add_argument("file", type=Path)
    commands.add_parser("export", help="the database as a tenants.yaml, to stdout")
    token = commands.add_parser("token", help="an admin JWT signed with the local key (run/pki)")
    token.add_argument("--pki", type=Path, default=Path("run/pki"))
    token.add_argument("--ttl", type=duration_s, default=3600.0)
    token.add_argument("--subject", default=os.environ.get("USER", "admin"))

    commands.add_parser("tiers", help="list the tiers")
    tenants = commands.add_parser("tenants").add_subparsers(dest="action", required=True)
    tenants.add_parser("list")
    created = tenants.add_parser("create")
    created.add_argument("id")
    created.add_argument("--tier", required=True)
    updated = tenants.add_parser("update")
    updated.add_argument("id")
    updated.add_argument("--tier")
    state = updated.add_mutually_exclusive_group()
    state.add_argument("--suspend", action="store_const", const=True, dest="suspended")
    state.add_argument("--resume", action="store_const", const=False, dest="suspended")

    keys = commands.add_parser("keys").add_subparsers(dest="action", required=True)
    listed = keys.add_parser("list")
    listed.add_argument("--tenant", default="")
    listed.add_argument("--prefix", default="")
    listed.add_argument("--include-revoked", action="store_true")
    made = keys.add_parser("create")
    made.add_argument("tenant")
    made.add_argument("--expires-in", type=duration_s, default=0.0)
    made.add_argument("--model", action="append", default=[], help="a model the key may use (repeat); none: all")
    made.add_argument("--label", type=label, action="append", default=[])
    made.add_argument("--rpm", type=int, default=0, help="the key's own requests/min, under its tier's")
    made.add_argument("--burst", type=int, default=0, help="with --rpm: the key's own burst")
    made.add_argument("--tokens-per-minute", type=int, default=0, help="the key's own, under its tier's")
    made.add_argument("--tokens-per-month", type=int, default=0, help="the key's own, under its tier's")
    rotated = keys.add_parser("rotate")
    rotated.add_argument("id")
    rotated.add_argument("--overlap", type=duration_s, default=3600.0)
    revoked = keys.add_parser("revoke")
    revoked.add_argument("id")

    usage = commands.add_parser("usage", help="OpenAI-shaped usage or cost buckets (as /v1/organization/...)")
    usage.add_argument("report", choices=["completions", "embeddings", "costs"])
    usage.add_argument("--since", type=duration_s, default=7 * 86400.0)
    usage.add_argument("--bucket", default="1d", choices=["1m", "1h", "1d"])
    usage.add_argument("--group-by", action="append", default=[])
    usage.add_argument("--tenant", action="append", default=[])
    usage.add_argument("--limit", type=int)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "token":
        from tools.pki import Pki, mint_admin_jwt
        print(mint_admin_jwt(Pki(args.pki), args.subject, args.ttl))
        return
    store = AdminStore.open(args.db)
    try:
        if args.command == "usage":
            now = int(time.time())
            page = report(store.engine, UsageQuery(args.report, now - int(args.since), now + 1, args.bucket,
                                                   tuple(args.group_by), tuple(args.tenant), limit=args.limit))
            print(json.dumps(page, indent=2))
        elif args.command == "import":
            store.import_config(TenantConfig.load(args.file))
            print(f"imported {args.file}", file=sys.stderr)
        elif args.command == "export":
            config = store.export_config()
            print(yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=False), end="")
        elif args.command == "tiers":
            _show(admin_pb2.ListTiersResponse(tiers=store.list_tiers()))
        elif args.command == "tenants":
            if args.action == "list":
                _show(admin_pb2.ListTenantsResponse(tenants=store.list_tenants()))
            elif args.action == "create":
                _show(store.create_tenant(args.id, args.tier))
            else:
                _show(store.update_tenant(args.id, args.tier, args.suspended))
        elif args.action == "list":
            _show(admin_pb2.ListKeysResponse(keys=store.list_keys(args.tenant, args.prefix, args.include_revoked)))
        elif args.action == "create":
            key, secret = store.create_key(args.tenant, time.time() + args.expires_in if args.expires_in else 0.0,
                                           args.model, dict(args.label), args.rpm, args.burst,
                                           args.tokens_per_minute, args.tokens_per_month)
            _show(admin_pb2.CreatedKey(key=key, secret=secret))
        elif args.action == "rotate":
            key, secret = store.rotate_key(args.id, args.overlap)
            _show(admin_pb2.CreatedKey(key=key, secret=secret))
        else:
            _show(store.revoke_key(args.id))
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except MeshError as exc:
        print(f"{exc.code.name}: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
