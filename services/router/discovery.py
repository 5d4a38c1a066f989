"""Triton replicas from DNS: the SRV records of a pool's headless Service name every ready pod and its port.

Kubernetes publishes `_<port name>._tcp.<service>.<namespace>.svc.cluster.local` with one SRV record per ready
endpoint, whose target is the pod's own name (`triton-a100-0.triton-a100.<namespace>.svc.cluster.local` for a
StatefulSet). A replica is then that target's address, dialled directly (the router balances per replica; a
Service's virtual IP would hide them), with the target as the TLS authority. A pod that stops, fails readiness or
is replaced leaves the records and is drained (services/router/replicas.py retire); a new one joins.
"""

from __future__ import annotations

import ipaddress
import logging

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from services.router.registry import DnsDiscovery, ReplicaSpec

log = logging.getLogger(__name__)


def _nameserver(address: str) -> dns.nameserver.Do53Nameserver:
    host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "53")
    return dns.nameserver.Do53Nameserver(host or address, int(port or 53))


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


class SrvDiscovery:
    """nameservers: "host:port" to ask instead of the system's resolver (tests run their own DNS server)."""

    def __init__(self, nameservers: list[str], timeout_s: float) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = [_nameserver(n) for n in nameservers]
        self._resolver.lifetime = timeout_s

    async def _address(self, host: str) -> str | None:
        for kind in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, kind, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            return sorted(record.address for record in answer)[0]
        return None

    async def replicas(self, pool: str, spec: DnsDiscovery) -> list[ReplicaSpec] | None:
        """The pool's replicas now; [] when DNS says there are none; None when DNS did not answer (the caller
        keeps what it had: a resolver's hiccup must not drain a whole pool)."""
        try:
            answer = await self._resolver.resolve(spec.srv, "SRV", search=False)
            records = sorted((str(r.target).rstrip("."), r.port) for r in answer)
            found: list[ReplicaSpec] = []
            for target, port in records:
                address = await self._address(target)
                if address is None:   # the pod went away between the two lookups
                    continue
                found.append(ReplicaSpec(
                    name=target.split(".")[0], grpc=_endpoint(address, port), authority=target,
                    metrics=_endpoint(address, spec.metrics_port) if spec.metrics_port else ""))
            return found
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            log.warning("replica discovery failed; keeping the pool's replicas",
                        extra={"pool": pool, "srv": spec.srv, "error": str(exc)})
            return None
