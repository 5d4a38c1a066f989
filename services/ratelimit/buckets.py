"""Request buckets and token budgets in Redis, shared by every rate-limit replica.

Each decision is one Lua script, so concurrent replicas never read-modify-write the same bucket in two steps.
Buckets read the clock from Redis (TIME), so replicas on hosts with skewed clocks still agree.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import redis.asyncio as redis

# A token bucket: `capacity` tokens, refilled at `rate` per second. mode "take": spend `cost` if that many are
# there. mode "charge": spend `cost` even into debt (usage is known only after the fact). mode "peek": no change.
# Returns {allowed, level, seconds until level reaches the cost (take) or turns positive (charge/peek)}.
_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - ts) * rate)
local allowed = 1
local granted = 0
if mode == 'lease' then
  -- ARGV[5]: tokens of an earlier lease given back first; ARGV[6]: the most tokens to lease. The caller needs
  -- `cost` of them now: the lease is refused unless that many are there, and never takes more than there are.
  level = math.min(capacity, level + tonumber(ARGV[5]))
  if level >= cost then
    granted = math.max(cost, math.min(tonumber(ARGV[6]), math.floor(level)))
    level = level - granted
  else allowed = 0 end
elseif mode == 'take' then
  if level >= cost then level = level - cost else allowed = 0 end
elseif mode == 'charge' then
  level = level - cost
else
  if level <= 0 then allowed = 0 end
end
if mode ~= 'peek' then
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - math.min(level, 0)) / rate * 1000) + 1000)
end
local wait = 0
if (mode == 'take' or mode == 'lease') and allowed == 0 then wait = (cost - level) / rate
elseif level <= 0 then wait = (-level) / rate + 0.001 end
return {allowed, tostring(level), tostring(wait), tostring(granted)}
"""

MONTH_KEY_TTL_S = 40 * 24 * 3600


@dataclass(frozen=True)
class BucketState:
    allowed: bool
    level: float
    wait_s: float
    granted: float = 0.0


def seconds_to_next_month(now: dt.datetime) -> float:
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    return (following - now).total_seconds()


class LimitStore:
    def __init__(self, redis_url: str, key_prefix: str, timeout_s: float) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._bucket = self.redis.register_script(_BUCKET)
        self._prefix = key_prefix

    async def close(self) -> None:
        await self.redis.aclose()

    async def _run(self, key: str, capacity: float, rate_per_s: float, cost: float, mode: str,
                   *lease: float) -> BucketState:
        allowed, level, wait, granted = await self._bucket(keys=[key], args=[capacity, rate_per_s, cost, mode,
                                                                             *lease])
        return BucketState(bool(allowed), float(level), float(wait), float(granted))

    def _requests_key(self, tenant: str) -> str:
        return f"{self._prefix}:requests:{tenant}"

    async def take_request(self, tenant: str, requests_per_minute: int, burst: int, hits: int = 1) -> BucketState:
        return await self._run(self._requests_key(tenant), burst, requests_per_minute / 60.0, hits, "take")

    async def lease_requests(self, tenant: str, requests_per_minute: int, burst: int, hits: int, most: int,
                             give_back: float = 0.0) -> BucketState:
        """Takes `hits` and up to `most` in all (`granted`), after giving back `give_back` unspent tokens."""
        return await self._run(self._requests_key(tenant), burst, requests_per_minute / 60.0, hits, "lease",
                               give_back, most)

    async def give_back(self, tenant: str, requests_per_minute: int, burst: int, tokens: float) -> None:
        """Unspent leased tokens back into the shared bucket (capped at its capacity)."""
        await self._run(self._requests_key(tenant), burst, requests_per_minute / 60.0, 0, "lease", tokens, 0)

    async def minute_tokens(self, tenant: str, tokens_per_minute: int, charge: int = 0) -> BucketState:
        key = f"{self._prefix}:tokens-minute:{tenant}"
        rate = tokens_per_minute / 60.0
        return await self._run(key, tokens_per_minute, rate, charge, "charge" if charge else "peek")

    def _month_key(self, tenant: str, now: dt.datetime) -> str:
        return f"{self._prefix}:tokens-month:{tenant}:{now:%Y-%m}"

    async def month_used(self, tenant: str, now: dt.datetime) -> int:
        return int(await self.redis.get(self._month_key(tenant, now)) or 0)

    async def charge_month(self, tenant: str, tokens: int, now: dt.datetime) -> int:
        key = self._month_key(tenant, now)
        async with self.redis.pipeline(transaction=True) as pipe:
            used, _ = await pipe.incrby(key, tokens).expire(key, MONTH_KEY_TTL_S).execute()
        return int(used)

    async def reset(self, tenant: str) -> None:
        """Operators: forget a tenant's buckets and this month's usage (e.g. after raising its tier)."""
        keys = [key async for key in self.redis.scan_iter(match=f"{self._prefix}:*:{tenant}*")]
        if keys:
            await self.redis.delete(*keys)
