"""Translate a non-streaming upstream answer into the `ClientError` the client receives.

Used by the reframe stage (every status) and the rate-limit translator (429) once the upstream
has answered with something other than an SSE stream. The table is SPEC §4; upstream messages
are kept, but bounded and with anything key-like removed, and never for 401/403 (those are the
gateway's own credentials). Pure functions; no I/O.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from ds2oai import jsonutil
from ds2oai.errors import (
    ClientError,
    GatewayError,
    UpstreamConnectError,
    UpstreamStreamError,
    UpstreamTimeoutError,
)
from ds2oai.events import error_code
from ds2oai.store.base import StoreError

__all__ = [
    "BROKEN_MESSAGE",
    "CUT_MESSAGE",
    "MAX_MESSAGE",
    "broken_error",
    "client_error_for",
    "error_from_upstream",
    "retry_after_headers",
    "retry_after_value",
    "sanitize_code",
    "sanitize_message",
    "upstream_error_fields",
    "upstream_event_error",
]

MAX_MESSAGE = 500
MAX_CODE = 100
MAX_RETRY_AFTER = 86400.0
_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+|\*{2,}[A-Za-z0-9]{2,})", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A run this long of one of the gateway's keys, in any case, is a leak: an upstream's
# `sk-abcd1234...wxyz` mask, "key ending in 5678abcd", a key cut in two by a line break.
FRAGMENT = 8


def sanitize_message(message: str, secrets: tuple[str, ...] = ()) -> str:
    """Bound the length, drop control characters and anything that looks like a key: each of
    `secrets` whole, any run of `FRAGMENT` or more of its characters in any case, and the
    usual key shapes."""
    # What is past this is cut below anyway: the scans need not see it.
    message = message[: 4 * MAX_MESSAGE]
    # Longest first: a key that contains another must not leave its rest behind.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            message = message.replace(secret, "[redacted]")
    message = _redact_fragments(message, secrets)
    message = _KEYLIKE.sub("[redacted]", message)
    message = _CONTROL.sub(" ", message)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    return message


@functools.lru_cache(maxsize=64)
def _windows(secret: str) -> frozenset[str]:
    key = secret.lower()
    return frozenset(key[i : i + FRAGMENT] for i in range(len(key) - FRAGMENT + 1))


def _redact_fragments(message: str, secrets: tuple[str, ...]) -> str:
    windows = frozenset().union(*(_windows(s) for s in secrets if len(s) >= FRAGMENT))
    if not windows or len(message) < FRAGMENT:
        return message
    low = message.lower()
    if len(low) != len(message):  # a few characters lower to two: keep positions aligned
        low = "".join(c.lower()[:1] or c for c in message)
    marked = bytearray(len(message))
    for i in range(len(message) - FRAGMENT + 1):
        if low[i : i + FRAGMENT] in windows:
            marked[i : i + FRAGMENT] = b"\x01" * FRAGMENT
    if not any(marked):
        return message
    out: list[str] = []
    i = 0
    while i < len(message):
        if marked[i]:
            while i < len(message) and marked[i]:
                i += 1
            out.append("[redacted]")
        else:
            start = i
            while i < len(message) and not marked[i]:
                i += 1
            out.append(message[start:i])
    return "".join(out)


def sanitize_code(code: str, secrets: tuple[str, ...] = ()) -> str:
    """An upstream's error code as a client may see it: as `sanitize_message`, on one line,
    and short; "" when nothing is left (the caller falls back to its own code)."""
    clean = sanitize_message(code, secrets).replace("\n", " ").replace("\t", " ")
    return clean.strip()[:MAX_CODE]


def upstream_error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(code, message, param) from an upstream error body, whatever its shape; a code that is
    neither a string nor an integer is no code. Unsanitized: the caller cleans them."""
    try:
        obj: Any = jsonutil.loads(body.strip() or b"null")
    except jsonutil.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return None, text or None, None
    if isinstance(obj, dict):
        error = obj.get("error", obj)
        if isinstance(error, dict):
            message = error.get("message")
            param = error.get("param")
            if message is None and "error" not in obj:
                message = _detail(obj.get("detail"))
            return (
                error_code(error.get("code")),
                str(message) if message is not None else None,
                param if isinstance(param, str) and param else None,
            )
        if isinstance(error, str):
            return None, error, None
    return None, None, None


def _detail(detail: Any) -> str | None:
    """FastAPI/Starlette's `{"detail": "..."}` or its validation list `[{"loc", "msg"}, ...]`
    (OpenAI-compatible servers built on them answer so)."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and isinstance(item.get("msg"), str):
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
                parts.append(f"{where}: {item['msg']}" if where else item["msg"])
        return "; ".join(parts) or None
    return None


def error_from_upstream(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    secrets: tuple[str, ...] = (),
    default_retry_after: float = 1.0,
    retried: bool = False,
) -> ClientError:
    """The SPEC §4 row for an upstream answer with `status` that is not a usable stream.

    `retried`: the gateway gave up on it after retrying; the answer then says `x-should-retry:
    false` (a 429 keeps its `Retry-After` too, for clients that pace themselves): the openai
    SDKs' own retries on top of the gateway's would multiply the upstream's load."""
    coding = headers.get("content-encoding", "").strip().lower()
    if coding not in _READABLE_CODINGS:
        body = b""  # compressed in a way the client did not ask for: not words to pass on
    code, message, param = upstream_error_fields(body)
    code = (sanitize_code(code, secrets) or None) if code else None
    param = (sanitize_code(param, secrets) or None) if param else None
    clean = sanitize_message(message, secrets) if message else None
    if status in (401, 403):
        return ClientError(
            502,
            "upstream_connection_error",
            "upstream_auth",
            "The upstream rejected the gateway's credentials",
            headers=_NO_RETRY,  # a configuration error: trying again cannot help
        )
    if status == 429:
        retry_after = retry_after_value(headers, default_retry_after)
        limited = retry_after_headers(retry_after)
        return ClientError(
            429,
            "rate_limit_error",
            "rate_limit",
            clean or "The upstream rate limit was reached",
            headers={**limited, **_NO_RETRY} if retried else limited,
        )
    if status == 402:
        return ClientError(
            402,
            "insufficient_quota",
            "insufficient_balance",
            clean or "The upstream account has insufficient balance",
            headers={"x-should-retry": "false"},
        )
    if status in (400, 422):
        return ClientError(
            status,
            "invalid_request_error",
            code or "invalid_request_error",
            clean or "The upstream rejected the request",
            param=param,
        )
    if 400 <= status < 500 and status not in (408, 409):
        # Another refusal of this very request (404: a wrong base_url; 413, 415, ...): the same
        # request gets the same answer, so the SDKs must not retry the 502 (they would: they
        # retry every 5xx).
        default = "The upstream has no such endpoint" if status == 404 else None
        return ClientError(
            502,
            "upstream_connection_error",
            f"upstream_status_{status}",
            clean or default or f"The upstream answered HTTP {status}",
            param=param,
            headers=_NO_RETRY,
        )
    if retried:
        hints: Mapping[str, str] = _NO_RETRY
    else:  # the upstream's own hint of when to come back (a 503's Retry-After), if it gave one
        hinted = retry_after_value(headers, -1.0)
        hints = retry_after_headers(hinted) if hinted >= 0 else {}
    return ClientError(
        502,
        "upstream_connection_error",
        f"upstream_status_{status}",
        clean or f"The upstream answered HTTP {status}",
        headers=hints,
    )


_NO_RETRY: Mapping[str, str] = {"x-should-retry": "false"}

# What the upstream client inflates (it asks for nothing else).
_READABLE_CODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (rounded up, at least 1) and, when above zero, the exact
    `retry-after-ms` the openai SDKs prefer (they ignore 0 and fall back to their backoff)."""
    headers = {"Retry-After": str(max(1, math.ceil(seconds)))}
    if seconds > 0:
        headers["retry-after-ms"] = str(max(1, round(seconds * 1000)))
    return headers


def retry_after_value(headers: Mapping[str, str], default: float) -> float:
    """Seconds from `retry-after-ms` or `retry-after` (delta seconds); `default` if absent.
    At most a day: a larger hint is passed on as a day (and would overflow the arithmetic)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
            if math.isfinite(value) and value >= 0:
                return min(value, MAX_RETRY_AFTER)
        except ValueError:
            pass
    seconds = headers.get("retry-after")
    if seconds:
        try:
            value = float(seconds)
            if math.isfinite(value) and value >= 0:
                return min(value, MAX_RETRY_AFTER)
        except ValueError:
            try:
                when = parsedate_to_datetime(seconds).timestamp()
                return min(max(0.0, when - time.time()), MAX_RETRY_AFTER)
            except (TypeError, ValueError, OverflowError):
                pass
    return default


BROKEN_MESSAGE = "Upstream SSE connection closed unexpectedly"
CUT_MESSAGE = "The upstream stopped the answer early: insufficient system resource"


def broken_error(message: str = BROKEN_MESSAGE, *, timeout: bool = False) -> ClientError:
    """The HTTP error for a stream that broke before the client received anything."""
    if timeout:
        return ClientError(504, "upstream_connection_error", "upstream_timeout", message)
    return ClientError(502, "upstream_connection_error", "upstream_stream_broken", message)


def upstream_event_error(code: str, message: str, secrets: tuple[str, ...] = ()) -> ClientError:
    """The HTTP error for an upstream `{"error": ...}` event before anything was sent."""
    code = sanitize_code(code, secrets) or "upstream_error"
    return ClientError(502, "upstream_error", code, sanitize_message(message, secrets))


def client_error_for(exc: GatewayError) -> ClientError:
    """The HTTP error for any ds2oai error that reached the boundary before the first byte."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, UpstreamConnectError):
        headers = _NO_RETRY if exc.retried else None
        status, code = (504, "upstream_timeout") if exc.timeout else (502, "connect_failed")
        return ClientError(status, "upstream_connection_error", code, str(exc), headers=headers)
    if isinstance(exc, UpstreamTimeoutError):
        return ClientError(504, "upstream_connection_error", "upstream_timeout", str(exc))
    if isinstance(exc, UpstreamStreamError):
        return broken_error(exc.message, timeout=exc.timeout)
    if isinstance(exc, StoreError):
        return ClientError(503, "server_error", "store_unavailable", "The response store failed")
    return ClientError(500, "server_error", "internal_error", "Internal gateway error")
