"""The chart's internal certificates: one kubernetes.io/tls Secret per mesh identity (`<prefix>-<identity>`: tls.crt,
tls.key, ca.crt, the shape cert-manager writes too), each certificate naming exactly the Service names the chart's
pods dial that identity by. gRPC checks the name it dialled against the certificate, so a certificate made for
compose (`router`, `router-1`, ...) fails every hop of a cluster (`mesh-router-pods.mesh.svc.cluster.local`).

    python -m tools.kube.internal_pki --namespace mesh --pools cpu,a100,t4 --out internal-pki.yaml
    kubectl apply -f internal-pki.yaml && rm internal-pki.yaml

Signed by the internal CA in run/pki (made there if absent); the chart's templates/internal-pki.yaml asks
cert-manager for the same names instead when `internalPki.certManager.enabled`.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import yaml

from tools.pki import DEFAULT_DIR, ensure_pki, internal_ca, issue_internal

# The chart's mesh services (a Deployment, a ClusterIP Service mesh-<name> and a headless mesh-<name>-pods each).
SERVICES = ("gateway", "router", "cache", "retrieval", "ratelimit")
IDENTITIES = ("edge", *SERVICES, "triton")
DEFAULT_PREFIX = "mesh-pki"


def dialled_names(identity: str, namespace: str, pools: list[str], cluster_domain: str = "cluster.local") -> list[str]:
    """Every name a pod of `identity` is dialled by in the chart, and the bare identity, which Envoy's upstream
    checks match (services/edge/render.py). Triton pods are dialled by their own names, found in their pool's
    headless Service (triton-a100-0.triton-a100.<namespace>.svc.<domain>): a wildcard covers the pods a scale-up
    adds."""
    names = [identity]
    services = {"triton": [f"triton-{pool}" for pool in pools]}.get(identity, [])
    if identity in SERVICES:
        services = [f"mesh-{identity}", f"mesh-{identity}-pods"]
    for service in services:
        qualified = f"{service}.{namespace}.svc.{cluster_domain}"
        names += [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", qualified]
        if identity == "triton":
            names.append(f"*.{qualified}")
    return names


def secrets(namespace: str, pools: list[str], prefix: str = DEFAULT_PREFIX, cluster_domain: str = "cluster.local",
            pki_dir: Path = DEFAULT_DIR) -> list[dict]:
    """One Secret per identity, each with a fresh key: a pod can only ever present its own identity."""
    pki = ensure_pki(pki_dir)
    ca, ca_key = internal_ca(pki)
    ca_pem = pki.internal_ca.read_bytes()
    documents = []
    for identity in IDENTITIES:
        cert, key = issue_internal(identity, tuple(dialled_names(identity, namespace, pools, cluster_domain)),
                                   ca, ca_key)
        documents.append({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": f"{prefix}-{identity}", "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "inference-mesh", "mesh.inference/identity": identity}},
            "data": {name: base64.b64encode(value).decode()
                     for name, value in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca_pem))},
        })
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.kube.internal_pki", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", required=True, help="the release's namespace")
    parser.add_argument("--pools", default="cpu,a100,t4", help="the enabled Triton pools, comma-separated")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the chart's secrets.internalPki")
    parser.add_argument("--cluster-domain", default="cluster.local", help="the chart's clusterDomain")
    parser.add_argument("--pki-dir", type=Path, default=DEFAULT_DIR, help="where the internal CA is")
    parser.add_argument("--out", type=Path, help="file to write (mode 0600); default: standard output")
    args = parser.parse_args()
    pools = [pool.strip() for pool in args.pools.split(",") if pool.strip()]
    text = yaml.safe_dump_all(secrets(args.namespace, pools, args.prefix, args.cluster_domain, args.pki_dir))
    if args.out is None:
        sys.stdout.write(text)
        return
    descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    print(f"{len(IDENTITIES)} Secrets ({', '.join(IDENTITIES)}) in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
