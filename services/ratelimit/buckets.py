"""Request buckets and token budgets in Redis, shared by every rate-limit replica.

Each decision is one Lua script, so concurrent replicas never read-modify-write the same bucket in two steps.
Buckets read the clock from Redis (TIME), so replicas on hosts with skewed clocks still agree. Every key of a
tenant carries the tenant's hash tag, so on a Redis Cluster each script's keys share one slot (one master).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.redis_connection import connect, slot_tag

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
# How long a settled reservation is remembered, so that a settle sent twice is applied once.
SETTLED_TOMBSTONE_MS = 10 * 60 * 1000

# Usage charged to a month counter, which expires after the month (one key: atomic without MULTI, which a cluster
# client cannot run across nodes).
_CHARGE = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return used
"""

# Reserve a generation's worst case against both token windows, or refuse. KEYS: minute bucket, month counter,
# reservation hash, reservations by expiry. ARGV: minute capacity (0: no minute window), rate, tokens, month limit
# (0: none), month key ttl, reservation id, ttl seconds, tenant, month key name. A worst case larger than a whole
# window is admitted only from a full window (it would never fit otherwise). Returns {allowed, window refused
# (1 minute, 2 month), minute level, seconds until it fits, month used}.
_RESERVE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local month_limit = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- Made already: the client sent this call again after a timeout or a failover (ids are never reused).
  return {1, 0, tostring(capacity), '0', tostring(redis.call('GET', KEYS[2]) or '0')}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level, ts = capacity, now
if capacity > 0 then
  local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
  level = tonumber(state[1]) or capacity
  ts = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - ts) * rate)
  local needed = math.min(tokens, capacity)
  if level < needed then
    return {0, 1, tostring(level), tostring((needed - level) / rate), '0'}
  end
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if month_limit > 0 and used + math.min(tokens, month_limit) > month_limit then
  return {0, 2, tostring(level), '0', tostring(used)}
end
if capacity > 0 then
  level = level - tokens
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - math.min(level, 0)) / rate * 1000) + 1000)
end
if month_limit > 0 then
  used = redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
local ttl = tonumber(ARGV[7])
redis.call('HSET', KEYS[3], 'tenant', ARGV[8], 'tokens', tokens, 'month_key', ARGV[9])
redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 2000) + 60000)
redis.call('ZADD', KEYS[4], now + ttl, ARGV[6])
return {1, 0, tostring(level), '0', tostring(used)}
"""

# Settle a reservation with what was really used: the rest goes back to both windows (or, if the reservation is
# gone, the use is charged as it is). KEYS: minute bucket, reservation hash, reservations by expiry. ARGV: minute
# capacity (0: none), rate, used tokens, reservation id, month limit (0: none), month key ttl, current month key,
# tombstone ms (0: none). A settled reservation leaves a tombstone for that long, so the same call sent again
# (a client's retry after a timeout or a failover) changes nothing; the sweep of expired ones leaves none, so a
# gateway settling after its reservation expired is charged.
_SETTLE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local used = tonumber(ARGV[3])
local reserved = redis.call('HMGET', KEYS[2], 'tokens', 'month_key', 'settled')
if reserved[3] then return 1 end
local found = reserved[1] ~= false and reserved[1] ~= nil
local back = used
local month_key = ARGV[7]
if found then
  back = tonumber(reserved[1]) - used
  month_key = reserved[2]
  if tonumber(ARGV[8]) > 0 then
    redis.call('HSET', KEYS[2], 'settled', '1')
    redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[8]))
  else
    redis.call('DEL', KEYS[2])
  end
  redis.call('ZREM', KEYS[3], ARGV[4])
else
  back = -used
end
if back ~= 0 and capacity > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local level = tonumber(state[1]) or capacity
  local ts = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - ts) * rate + back)
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - math.min(level, 0)) / rate * 1000) + 1000)
end
if back ~= 0 and tonumber(ARGV[5]) > 0 then
  redis.call('INCRBY', month_key, -back)
  redis.call('EXPIRE', month_key, tonumber(ARGV[6]))
end
if found then return 1 end
return 0
"""


def glob_escape(text: str) -> str:
    """`text` matched literally by SCAN's MATCH (tenant ids and prefixes may hold glob characters)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@dataclass(frozen=True)
class Reservation:
    allowed: bool
    refused_window: int     # 0 none, 1 minute, 2 month
    minute_level: float
    wait_s: float
    month_used: int
    reservation: str = ""


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
        self.redis = connect(redis_url, timeout_s)
        self._bucket = self.redis.register_script(_BUCKET)
        self._charge = self.redis.register_script(_CHARGE)
        self._reserve = self.redis.register_script(_RESERVE)
        self._settle = self.redis.register_script(_SETTLE)
        self._prefix = key_prefix

    async def close(self) -> None:
        await self.redis.aclose()

    async def _run(self, key: str, capacity: float, rate_per_s: float, cost: float, mode: str,
                   *lease: float) -> BucketState:
        allowed, level, wait, granted = await self._bucket(keys=[key], args=[capacity, rate_per_s, cost, mode,
                                                                             *lease])
        return BucketState(bool(allowed), float(level), float(wait), float(granted))

    def _tenant_key(self, tenant: str, what: str) -> str:
        return f"{self._prefix}:{slot_tag(tenant)}:{what}"

    def _requests_key(self, tenant: str) -> str:
        return self._tenant_key(tenant, "requests")

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
        key = self._minute_key(tenant)
        rate = tokens_per_minute / 60.0
        return await self._run(key, tokens_per_minute, rate, charge, "charge" if charge else "peek")

    def _month_key(self, tenant: str, now: dt.datetime) -> str:
        return self._tenant_key(tenant, f"tokens-month:{now:%Y-%m}")

    async def month_used(self, tenant: str, now: dt.datetime) -> int:
        return int(await self.redis.get(self._month_key(tenant, now)) or 0)

    async def charge_month(self, tenant: str, tokens: int, now: dt.datetime) -> int:
        return int(await self._charge(keys=[self._month_key(tenant, now)], args=[tokens, MONTH_KEY_TTL_S]))

    def _minute_key(self, tenant: str) -> str:
        return self._tenant_key(tenant, "tokens-minute")

    def _reservation_key(self, tenant: str, reservation: str) -> str:
        return self._tenant_key(tenant, f"reservation:{reservation}")

    def _reservations_key(self, tenant: str) -> str:
        """The tenant's reservations by expiry (one set per tenant: a shared one would sit in another slot)."""
        return self._tenant_key(tenant, "reservations")

    async def reserve(self, tenant: str, tokens_per_minute: int, tokens_per_month: int, tokens: int, ttl_s: float,
                      now: dt.datetime) -> Reservation:
        reservation = secrets.token_hex(12)
        month_key = self._month_key(tenant, now)
        allowed, window, level, wait, used = await self._reserve(
            keys=[self._minute_key(tenant), month_key, self._reservation_key(tenant, reservation),
                  self._reservations_key(tenant)],
            args=[tokens_per_minute, tokens_per_minute / 60.0, tokens, tokens_per_month, MONTH_KEY_TTL_S,
                  reservation, ttl_s, tenant, month_key])
        return Reservation(bool(allowed), int(window), float(level), float(wait), int(float(used)),
                           reservation if allowed else "")

    async def settle(self, tenant: str, tokens_per_minute: int, tokens_per_month: int, reservation: str, used: int,
                     now: dt.datetime, expiring: bool = False) -> bool:
        """True when the reservation was there (the rest went back); False: it had expired, `used` was charged.
        `expiring`: the sweep giving back a reservation nobody settled (no tombstone: a late settle is charged)."""
        return bool(await self._settle(
            keys=[self._minute_key(tenant), self._reservation_key(tenant, reservation),
                  self._reservations_key(tenant)],
            args=[tokens_per_minute, tokens_per_minute / 60.0, used, reservation, tokens_per_month, MONTH_KEY_TTL_S,
                  self._month_key(tenant, now), 0 if expiring else SETTLED_TOMBSTONE_MS]))

    async def expired_reservations(self, tenants: Iterable[str], limit: int = 100) -> list[tuple[str, str]]:
        """(reservation, tenant) of the tenants' reservations past their time (by Redis's clock)."""
        seconds, micros = await self.redis.time()
        found: list[tuple[str, str]] = []
        for tenant in tenants:
            ids = await self.redis.zrangebyscore(self._reservations_key(tenant), "-inf", seconds + micros / 1e6,
                                                 start=0, num=limit - len(found))
            for raw in ids:
                reservation = raw.decode() if isinstance(raw, bytes) else raw
                if not await self.redis.exists(self._reservation_key(tenant, reservation)):
                    await self.redis.zrem(self._reservations_key(tenant), reservation)  # nothing held any more
                    continue
                found.append((reservation, tenant))
            if len(found) >= limit:
                break
        return found

    async def reset(self, tenant: str) -> None:
        """Operators: forget a tenant's buckets and this month's usage (e.g. after raising its tier)."""
        pattern = glob_escape(f"{self._prefix}:{slot_tag(tenant)}:") + "*"
        keys = [key async for key in self.redis.scan_iter(match=pattern)]
        for key in keys:  # one by one: on a cluster a multi-key DEL must stay in one slot
            await self.redis.delete(key)
