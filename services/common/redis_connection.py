"""One way to reach Redis for every service: a single server or a Redis Cluster, chosen by the URL's scheme.

`redis://host:port/db` (or `rediss://`, `unix://`) is one server; `redis+cluster://host:port` (or
`rediss+cluster://`) is a Redis Cluster reached through any of its nodes (the client learns the rest and follows
MOVED/ASK redirections and failovers). Keys that one command or one Lua script touches together carry the same
hash tag (`slot_tag`), so each such call lands in one slot on one master, as a cluster requires.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError


class _FailoverSafeCluster(RedisCluster):
    """redis-py's asyncio cluster client closes every connection when one node fails (to relearn the slots), under
    the feet of other calls in flight, which then fail with AttributeError or TypeError from a torn-down socket
    (redis/redis-py#3546, #3835; seen here in tests/integration/test_redis_cluster.py with 6.4 and 7.4). Those calls
    failed for the same reason as the first: they become ConnectionErrors, which the client retries on the new
    layout and callers already handle."""

    async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        except (AttributeError, TypeError) as exc:
            raise RedisConnectionError(f"connection to {target_node.name} closed during a failover: {exc}") from exc


RedisClient = aioredis.Redis | RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def connect(url: str, timeout_s: float, **options: Any) -> RedisClient:
    """A client whose calls fail within `timeout_s` rather than wait: callers degrade or answer UNAVAILABLE."""
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **options}
    parts = urlsplit(url)
    if parts.scheme not in _CLUSTER_SCHEMES:
        return aioredis.from_url(url, **options)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{url!r}: a Redis Cluster has only database 0; drop the /{parts.path.strip('/')}")
    # Single-server knobs a cluster client does not take: it retries through MOVED and failovers by itself.
    options.pop("health_check_interval", None)
    options.pop("retry_on_timeout", None)
    plain = urlunsplit((_CLUSTER_SCHEMES[parts.scheme], parts.netloc, "", parts.query, ""))
    return _FailoverSafeCluster.from_url(plain, **options)


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def slot_tag(name: str) -> str:
    """A Redis Cluster hash tag: keys holding the same tag live in the same slot. The prefix keeps the tag non-empty
    (an empty `{}` tags nothing) whatever `name` is; a `}` inside `name` only shortens the tag, and it does so alike
    for every key built from the same name."""
    return "{t:" + name + "}"


async def key_count_and_memory(client: RedisClient) -> tuple[int, int]:
    """(keys, bytes used): on a cluster, summed over the masters (a cluster client asks one random node unless told
    which)."""
    if not is_cluster(client):
        return int(await client.dbsize()), int((await client.info("memory")).get("used_memory", 0))
    keys = await client.dbsize(target_nodes=RedisCluster.PRIMARIES)
    info = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    return int(keys), sum(int(node.get("used_memory", 0)) for node in info.values() if isinstance(node, dict))
