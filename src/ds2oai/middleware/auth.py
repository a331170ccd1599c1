"""`auth` — client key check (`BearerAuth`).

Reads: the client's `Authorization: Bearer <key>` header (also `api-key`/`x-api-key`, which some
OpenAI-style clients send) and `exchange.exposed_model`. Keys come from `[auth] api_keys`, the
lines of `[auth] key_file`, `DS2OAI_API_KEYS` and the `[auth.clients.<name>]` tables (`key` or
`key_env`), all merged by `config.py`. Changes: sets `exchange.client_key` and a short hash of
it in the trace (`trace.client_key_id`; logs and metrics name keys by hash only; the `limits`
stage looks the key's limits up by it). Position: first, so nothing runs for a caller without a
key. Fails closed: a missing or wrong key is a 401 `authentication_error`; a model the key's
`models` list does not name is a 403 `permission_error` `model_not_allowed`; a named client
whose key could not be resolved refuses to start. With no keys configured it lets every
request through (the server then binds to loopback by default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Iterable, Mapping

from ds2oai.chain import Exchange, Next, Reply
from ds2oai.config import AuthConfig, Config
from ds2oai.errors import ClientError, ConfigError

__all__ = ["BearerAuth", "client_keys", "key_id"]


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key (for logs and metrics)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def client_keys(auth: AuthConfig) -> dict[str, tuple[str, ...]]:
    """Every accepted key -> the exposed models it may use (empty: all). Named clients win."""
    keys: dict[str, tuple[str, ...]] = {str(key): () for key in auth.api_keys}
    for name, client in auth.clients.items():
        if not client.key:
            # SECURITY: a named client without its key must not leave the gateway open.
            raise ConfigError(
                f"auth.clients.{name}: no key (key_env {client.key_env or '-'} not resolved)"
            )
        keys[str(client.key)] = client.models
    return keys


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

    def __init__(
        self, keys: Iterable[str], models: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        """`keys`: accepted keys; `models`: key -> allowed exposed model names (absent: all)."""
        allowed = models or {}
        self._keys = tuple((k.encode(), frozenset(allowed.get(k, ()))) for k in keys)

    @classmethod
    def from_config(cls, config: Config) -> BearerAuth:
        keys = client_keys(config.auth)
        return cls(tuple(keys), keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, headers: Mapping[str, str]) -> tuple[str, frozenset[str]] | None:
        """(key, allowed models) for the request's key; None when no keys are configured.

        Raises the 401. Also used by the routes outside the chain (models, stored responses).
        """
        if not self._keys:
            return None
        presented = _presented_key(headers)
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
        models: frozenset[str] = frozenset()
        for key, allowed in self._keys:
            equal = hmac.compare_digest(candidate, key)
            matched |= equal
            models = allowed if equal else models
        if not matched:
            raise ClientError(401, "authentication_error", "invalid_api_key", "Invalid API key")
        return presented, models

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        found = self.authenticate(exchange.client_headers)
        if found is None:
            return await call_next(exchange)
        presented, models = found
        exchange.trace.client_key_id = key_id(presented)
        if models and exchange.exposed_model not in models:
            raise ClientError(
                403,
                "permission_error",
                "model_not_allowed",
                f"This API key may not use the model {exchange.exposed_model[:100]!r}",
                param="model",
            )
        return await call_next(dataclasses.replace(exchange, client_key=presented))
