"""`max_tokens_cap` — cap (and default) the output tokens a client may ask for (`MaxTokensCap`).

Reads: `max_tokens` / `max_completion_tokens` in the upstream body. Changes: replaces the
exchange (never mutates it) so that the upstream receives `max_tokens <= limit`, and `default`
when the client set none; `max_completion_tokens` (the newer OpenAI name, which DeepSeek does
not know) is folded into `max_tokens`. Position: before `retry`, so every attempt sends the
same capped body. Fails: a non-integer value is a 400 `invalid_request_error`.

    [middleware]
    chain = ["auth", "middleware.max_tokens_cap:MaxTokensCap", "rate_limit", "retry", "reframe"]
    [middleware.max_tokens_cap]
    limit = 2048
    default = 1024
"""

from __future__ import annotations

import dataclasses

from ds2oai.chain import Exchange, Next, Reply
from ds2oai.errors import ClientError

__all__ = ["MaxTokensCap"]


class MaxTokensCap:
    name = "max_tokens_cap"

    def __init__(self, limit: int, default: int | None = None) -> None:
        if limit < 1 or (default is not None and not 1 <= default <= limit):
            raise ValueError("need 1 <= default <= limit")
        self._limit = limit
        self._default = default

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        body = dict(exchange.upstream_body)
        asked = body.pop("max_completion_tokens", None)
        asked = body.get("max_tokens", asked)
        if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int)):
            raise ClientError(
                400,
                "invalid_request_error",
                "invalid_max_tokens",
                "'max_tokens' must be an integer",
                param="max_tokens",
            )
        value = self._default if asked is None else min(asked, self._limit)
        if value is not None:
            body["max_tokens"] = value
        return await call_next(dataclasses.replace(exchange, upstream_body=body))
