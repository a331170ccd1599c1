"""`rate_limit` — upstream 429 to a downstream 429 (`RateLimitTranslator`).

Reads: the upstream reply status and its `Retry-After` / `retry-after-ms` headers. Changes: a 429
reply becomes a `ClientError` 429 `rate_limit_error` with `Retry-After` passed on, or computed
from `[rate_limit] default_retry_after` when the upstream sent none (DeepSeek never does), and
the upstream body is read (bounded) and closed. Position: outside `retry`, so it sees the 429
that is left after the retries. Fails: never swallows anything but a 429.
"""

from __future__ import annotations

from ds2oai.chain import Exchange, Next, Reply
from ds2oai.config import Config
from ds2oai.upstream import read_limited
from ds2oai.upstream_errors import error_from_upstream

__all__ = ["RateLimitTranslator"]


class RateLimitTranslator:
    name = "rate_limit"

    def __init__(self, default_retry_after: float = 1.0, secrets: tuple[str, ...] = ()) -> None:
        self._default = default_retry_after
        self._secrets = secrets

    @classmethod
    def from_config(cls, config: Config) -> RateLimitTranslator:
        return cls(config.rate_limit.default_retry_after, config.upstream_secrets())

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        reply = await call_next(exchange)
        if reply.status != 429:
            return reply
        body = await read_limited(reply.body)
        raise error_from_upstream(
            429,
            reply.headers,
            body,
            secrets=self._secrets,
            default_retry_after=self._default,
            retried=reply.retried,
        )
