"""Per-key limits (SPEC §6): counting backends for the `limits` middleware.

    limiter = open_limiter(config.limits)    # MemoryLimiter, or RedisLimiter with a redis_url
    decision = await limiter.acquire(key_id, rule, lease_id)
    ...
    await limiter.finish(key_id, rule, lease_id, tokens)
    await limiter.close()

See `ds2oai.limits.base` for the algorithms. The `redis` package is imported only when a
`redis_url` is configured.
"""

from __future__ import annotations

from ds2oai.config import LimitsConfig
from ds2oai.errors import ConfigError
from ds2oai.limits.base import (
    DEFAULT_LEASE,
    WINDOW,
    Decision,
    KeyRule,
    Limiter,
    LimiterError,
    MemoryLimiter,
)

__all__ = [
    "DEFAULT_LEASE",
    "WINDOW",
    "Decision",
    "KeyRule",
    "Limiter",
    "LimiterError",
    "MemoryLimiter",
    "open_limiter",
]


def open_limiter(config: LimitsConfig) -> Limiter:
    """The limiter `config` describes. Does no I/O; an unusable URL is a `ConfigError`."""
    if not config.redis_url:
        return MemoryLimiter()
    try:
        from ds2oai.limits.redis import RedisLimiter
    except ImportError as exc:  # pragma: no cover - redis is a declared extra
        raise ConfigError(f"limits.redis_url: needs the redis package ({exc})") from None
    try:
        return RedisLimiter(config.redis_url)
    except LimiterError as exc:
        raise ConfigError(f"limits.redis_url: {exc}") from None
