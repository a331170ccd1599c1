"""One way to open a Redis client, shared by the response store and the per-key limiter.

A `BlockingConnectionPool` (the default pool fails at once with "Too many connections" under a
burst of concurrent commands; this one waits up to `pool_timeout`), explicit timeouts, and a
short jittered retry (the library's default of 10 retries would hold a request for seconds while
Redis is down). Imported only where a Redis URL is configured. Errors propagate unchanged; the
callers wrap them without the URL's password.
"""

from __future__ import annotations

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

__all__ = ["connect"]


def connect(
    url: str,
    *,
    max_connections: int,
    pool_timeout: float,
    connect_timeout: float,
    socket_timeout: float,
    retries: int,
    backoff_base: float,
    backoff_cap: float,
) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        retry=Retry(ExponentialWithJitterBackoff(cap=backoff_cap, base=backoff_base), retries),
    )
    return redis.asyncio.Redis.from_pool(pool)
