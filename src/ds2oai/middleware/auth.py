"""`auth` — client key check (`BearerAuth`).

Reads: the client's `Authorization: Bearer <key>` header (also `api-key`/`x-api-key`, which some
OpenAI-style clients send). Changes: sets `exchange.client_key` and a short hash of it in the
trace (logs and metrics name keys by hash only). Position: first, so nothing runs for a caller
without a key. Fails closed: any missing or wrong key is a 401 `authentication_error`; with no
keys configured it lets every request through (the server then binds to loopback by default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

from ds2oai.chain import Exchange, Next, Reply
from ds2oai.config import Config
from ds2oai.errors import ClientError

__all__ = ["BearerAuth", "key_id"]


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key (for logs and metrics)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return headers.get("api-key") or headers.get("x-api-key")


class BearerAuth:
    name = "auth"

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @classmethod
    def from_config(cls, config: Config) -> BearerAuth:
        return cls(tuple(config.auth.api_keys))

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        if not self._keys:
            return await call_next(exchange)
        presented = _presented_key(exchange.client_headers)
        if presented is None:
            raise ClientError(
                401,
                "authentication_error",
                "invalid_api_key",
                "Missing API key: send 'Authorization: Bearer <key>'",
            )
        candidate = presented.encode()
        # SECURITY: compare against every key in constant time; no early exit on a match.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise ClientError(401, "authentication_error", "invalid_api_key", "Invalid API key")
        exchange.trace.client_key_id = key_id(presented)
        return await call_next(dataclasses.replace(exchange, client_key=presented))
