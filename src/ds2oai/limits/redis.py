"""`RedisLimiter`: per-key limits shared by gateway processes on any number of machines.

Each operation is one Lua script (`register_script`: EVALSHA, loaded again after a Redis
restart), so checking and recording happen atomically on the server — no read-then-write race
between processes. Time is the Redis server's (`TIME`), so the clocks of the gateway machines
do not matter. Keys, per client key id (a hash, never the key), with `{...}` as a cluster hash
tag so one script's keys share a slot:

    ds2oai:lim:{<key_id>}:req      sorted set, admitted requests (member: lease id, score: ms)
    ds2oai:lim:{<key_id>}:tok      sorted set, charged tokens (member: "<lease id>:<tokens>")
    ds2oai:lim:{<key_id>}:streams  sorted set, concurrency slots (score: lease expiry, ms)

Every write refreshes the key's TTL (the window, or the lease), so idle keys disappear.
The client and its failure handling follow `ds2oai.store.redis`: a `BlockingConnectionPool`,
explicit short timeouts, one retry; failures are `LimiterError`s with the URL's password
redacted and scrubbed from the driver's message, not chained.
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio
import redis.exceptions

from ds2oai.limits.base import DEFAULT_LEASE, WINDOW, Decision, KeyRule, LimiterError
from ds2oai.redis_client import connect
from ds2oai.store.base import redact_url, scrub, url_secrets

__all__ = ["KEY_PREFIX", "RedisLimiter"]

KEY_PREFIX: Final = "ds2oai:lim:"

_REASONS: Final = {0: None, 1: "requests", 2: "tokens", 3: "streams"}

# KEYS: req, tok, streams. ARGV: rpm, tpm, streams, lease id, window ms, lease ms.
# Returns {reason, requests_used, requests_reset_ms, tokens_used, tokens_reset_ms, retry_ms}.
# Idempotent per lease id: the client re-sends a script after a timeout, and Redis may have run
# the first one (it was only slow), so a lease already recorded is admitted again, not counted
# against itself.
_ACQUIRE: Final = """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, window, lease = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local again = (rpm > 0 and redis.call('ZSCORE', KEYS[1], member))
  or (conc > 0 and redis.call('ZSCORE', KEYS[3], member))
local used, reset = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  used = redis.call('ZCARD', KEYS[1])
  if used > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    reset = tonumber(oldest[2]) + window - now
  end
  if used >= rpm and not again then
    local nth = redis.call('ZRANGE', KEYS[1], used - rpm, used - rpm, 'WITHSCORES')
    return {1, used, reset, 0, 0, tonumber(nth[2]) + window - now}
  end
end
local total, tokens_reset = 0, 0
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  local charges = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #charges, 2 do
    total = total + tonumber(string.match(charges[i], ':(%d+)$'))
  end
  if #charges > 0 then
    tokens_reset = tonumber(charges[2]) + window - now
  end
  if total >= tpm and not again then
    local left = total
    for i = 1, #charges, 2 do
      left = left - tonumber(string.match(charges[i], ':(%d+)$'))
      tokens_reset = tonumber(charges[i + 1]) + window - now
      if left < tpm then break end
    end
    return {2, used, reset, total, tokens_reset, tokens_reset}
  end
end
if conc > 0 and not again then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then
    return {3, used, reset, total, tokens_reset, 1000}
  end
end
if rpm > 0 and not redis.call('ZSCORE', KEYS[1], member) then
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('PEXPIRE', KEYS[1], window)
  used = used + 1
  if reset == 0 then reset = window end
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, member)
  redis.call('PEXPIRE', KEYS[3], lease)
end
return {0, used, reset, total, tokens_reset, 0}
"""

# KEYS: tok, streams. ARGV: lease id, tokens, window ms.
_FINISH: Final = """
local tokens, window = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
if tokens > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[1], window)
end
return 1
"""

# KEYS: streams. ARGV: lease id, lease ms. Re-added even if it expired: the answer still runs.
_RENEW: Final = """
local lease = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""


class RedisLimiter:
    """Limits counted in the Redis at `url` (`redis://[[user]:password@]host:port/db`)."""

    def __init__(
        self,
        url: str,
        *,
        window: float = WINDOW,
        lease: float = DEFAULT_LEASE,
        key_prefix: str = KEY_PREFIX,
        connect_timeout: float = 1.0,
        socket_timeout: float = 2.0,
        retries: int = 1,
        max_connections: int = 64,
        pool_timeout: float = 2.0,
    ) -> None:
        self.where = redact_url(url)
        self._secrets = url_secrets(url)
        self._window_ms = max(1, round(window * 1000))
        self._lease_ms = max(1, round(lease * 1000))
        self._prefix = key_prefix
        self._closed = False
        try:
            self._client = connect(
                url,
                max_connections=max_connections,
                pool_timeout=pool_timeout,
                connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                retries=retries,
                backoff_base=0.02,
                backoff_cap=0.2,
            )
        except (ValueError, TypeError, redis.exceptions.RedisError) as exc:
            raise LimiterError(self._message("open", exc)) from None
        self._acquire = self._client.register_script(_ACQUIRE)
        self._finish = self._client.register_script(_FINISH)
        self._renew = self._client.register_script(_RENEW)

    def __repr__(self) -> str:
        return f"RedisLimiter({self.where!r})"

    def keys(self, key_id: str) -> tuple[str, str, str]:
        """The request log, token log and slot set of a key id."""
        base = f"{self._prefix}{{{key_id}}}:"
        return base + "req", base + "tok", base + "streams"

    def _message(self, op: str, exc: BaseException) -> str:
        detail = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        return f"redis limits {self.where}: {op} failed: {detail}"

    async def _run(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self._closed:
            raise LimiterError(f"redis limits {self.where}: {op} after close()")
        try:
            return await script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise LimiterError(self._message(op, exc)) from None

    async def acquire(self, key_id: str, rule: KeyRule, lease_id: str) -> Decision:
        args = [
            rule.requests_per_minute,
            rule.tokens_per_minute,
            rule.concurrent_streams,
            lease_id,
            self._window_ms,
            self._lease_ms,
        ]
        result = await self._run("acquire", self._acquire, list(self.keys(key_id)), args)
        try:
            reason, used, reset, tokens, tokens_reset, retry = (int(v) for v in result)
            refused = _REASONS[reason]
        except (TypeError, ValueError, KeyError):
            raise LimiterError(f"redis limits {self.where}: acquire: unexpected answer") from None
        return Decision(
            refused,
            requests_used=used,
            requests_reset=reset / 1000,
            tokens_used=tokens,
            tokens_reset=tokens_reset / 1000,
            retry_after=retry / 1000,
        )

    async def renew(self, key_id: str, lease_id: str) -> None:
        streams = self.keys(key_id)[2]
        await self._run("renew", self._renew, [streams], [lease_id, self._lease_ms])

    async def finish(self, key_id: str, rule: KeyRule, lease_id: str, tokens: int) -> None:
        charge = tokens if rule.tokens_per_minute and tokens > 0 else 0
        _req, tok, streams = self.keys(key_id)
        await self._run("finish", self._finish, [tok, streams], [lease_id, charge, self._window_ms])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.aclose()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise LimiterError(self._message("close", exc)) from None
