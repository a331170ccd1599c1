"""The one exception tree of ds2oai.

Everything the gateway raises on purpose derives from `GatewayError`. Transport failures are
translated into this tree in exactly one place (`upstream.py`); the error boundary in
`server.py` renders `ClientError` as an OpenAI-style JSON body before the first downstream
byte, and the dialects turn `UpstreamStreamError` into their terminal event after it.
Nothing here imports aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ClientError",
    "ConfigError",
    "GatewayError",
    "SSEDecodeError",
    "UpstreamConnectError",
    "UpstreamStreamError",
    "UpstreamTimeoutError",
]


class GatewayError(Exception):
    """Base of every error ds2oai raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the bad key or chain entry."""


class SSEDecodeError(GatewayError):
    """The upstream bytes cannot be decoded as SSE (for example an event over the size cap)."""


class ClientError(GatewayError):
    """An error answered to the client as HTTP `status` with an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        type: str,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        """The body `{"error": {"message", "type", "param", "code"}}` the OpenAI SDKs parse."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"ClientError({self.status}, {self.type!r}, {self.code!r}, {self.message!r})"


class UpstreamConnectError(GatewayError):
    """No usable upstream response: DNS, refused, reset before headers, TLS.

    `retryable` is false when trying again cannot help (the gateway is shutting down);
    `timeout` is true when the connection was not made within `upstream.connect_timeout` (still
    retried like any connect error, but answered as a timeout: SPEC §4's 504);
    `retried` is set by the retry stage when it gave up after trying again itself.
    """

    def __init__(self, message: str, *, retryable: bool = True, timeout: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout
        self.retried = False


class UpstreamTimeoutError(GatewayError):
    """The upstream sent no response headers within the configured time."""


class UpstreamStreamError(GatewayError):
    """The upstream body broke after the response began: reset, truncation or silence.

    `timeout` is true when the upstream was silent longer than `upstream.read_timeout`.
    """

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.timeout = timeout
