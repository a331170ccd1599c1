"""Unit tests of `upstream_errors`: the SPEC §4 table for upstream answers that are not streams."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from ds2oai.errors import ClientError, UpstreamConnectError
from ds2oai.upstream_errors import (
    MAX_MESSAGE,
    broken_error,
    client_error_for,
    error_from_upstream,
    retry_after_value,
    sanitize_message,
    upstream_error_fields,
    upstream_event_error,
)

PLANTED = "sk-test-SECRET123456"
GATEWAY_KEY = "gw-own-key-0123456789"


def ds_error(message: str, code: str | None = "invalid_request_error", **extra: Any) -> bytes:
    """A DeepSeek-shaped error body."""
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "param": None}
    error["code"] = code
    error.update(extra)
    return json.dumps({"error": error}).encode()


def triple(error: ClientError) -> tuple[int, str, str | None]:
    return error.status, error.type, error.code


# --------------------------------------------------------------------------- 401 / 403


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_502_upstream_auth(status: int) -> None:
    body = ds_error(f"Authentication Fails, Your api key: {PLANTED} is invalid", "invalid_api_key")
    error = error_from_upstream(status, {}, body, secrets=(PLANTED,))
    assert triple(error) == (502, "upstream_connection_error", "upstream_auth")


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_never_reveals_upstream_message_or_key(status: int) -> None:
    body = ds_error("Authentication Fails, Your api key: ****3456 is invalid; sk-live-abcdefgh")
    error = error_from_upstream(status, {}, body, secrets=(GATEWAY_KEY,))
    rendered = json.dumps(error.to_json())
    for leak in ("Authentication Fails", "****3456", "3456", "sk-live", GATEWAY_KEY):
        assert leak not in rendered
        assert leak not in repr(error)
    assert error.headers.get("Retry-After") is None


# --------------------------------------------------------------------------- 429


def test_429_without_retry_after_computes_it_from_the_default() -> None:
    error = error_from_upstream(429, {}, b"", default_retry_after=1.0)
    assert triple(error) == (429, "rate_limit_error", "rate_limit")
    assert error.headers["Retry-After"] == "1"
    assert error.headers["retry-after-ms"] == "1000"
    assert error.message


def test_429_default_retry_after_is_rounded_up_to_whole_seconds() -> None:
    error = error_from_upstream(429, {}, b"", default_retry_after=2.2)
    assert error.headers["Retry-After"] == "3"
    assert error.headers["retry-after-ms"] == "2200"


def test_429_retry_after_seconds_is_passed_on() -> None:
    error = error_from_upstream(429, {"retry-after": "7"}, b"", default_retry_after=1.0)
    assert error.headers["Retry-After"] == "7"
    assert error.headers["retry-after-ms"] == "7000"


def test_429_retry_after_zero_still_asks_for_one_second() -> None:
    error = error_from_upstream(429, {"retry-after": "0"}, b"")
    assert error.headers["Retry-After"] == "1"
    # no `retry-after-ms: 0`, which the openai SDKs discard for their own backoff
    assert "retry-after-ms" not in error.headers


def test_429_retry_after_ms_is_used_and_rounded_up() -> None:
    error = error_from_upstream(429, {"retry-after-ms": "1500"}, b"")
    assert error.headers["Retry-After"] == "2"
    assert error.headers["retry-after-ms"] == "1500"


def test_429_retry_after_ms_wins_over_retry_after() -> None:
    error = error_from_upstream(429, {"retry-after-ms": "250", "retry-after": "9"}, b"")
    assert error.headers["Retry-After"] == "1"
    assert error.headers["retry-after-ms"] == "250"


def test_429_retry_after_http_date_is_converted_to_seconds() -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    error = error_from_upstream(429, {"retry-after": format_datetime(when, usegmt=True)}, b"")
    assert 117 <= int(error.headers["Retry-After"]) <= 121


def test_429_after_the_gateways_retries_tells_the_sdks_not_to_retry() -> None:
    assert "x-should-retry" not in error_from_upstream(429, {"retry-after": "3"}, b"").headers
    error = error_from_upstream(429, {"retry-after": "3"}, b"", retried=True)
    assert error.headers["x-should-retry"] == "false"
    assert error.headers["Retry-After"] == "3"


def test_429_message_from_upstream_is_kept() -> None:
    error = error_from_upstream(429, {}, ds_error("Rate limit reached for requests", "rate"))
    assert error.message == "Rate limit reached for requests"
    assert error.code == "rate_limit"


@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
def test_429_with_infinite_retry_after_is_still_a_429(header: str) -> None:
    error = error_from_upstream(429, {header: "inf"}, b"", default_retry_after=1.0)
    assert error.status == 429
    assert error.headers["Retry-After"].isdigit()
    assert int(error.headers["Retry-After"]) >= 1


# --------------------------------------------------------------------------- retry_after_value


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 5.0),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "-2"}, 5.0),
        ({"retry-after": "soon"}, 5.0),
        ({"retry-after": ""}, 5.0),
        ({"retry-after-ms": "2500"}, 2.5),
        ({"retry-after-ms": "-1", "retry-after": "4"}, 4.0),
        ({"retry-after-ms": "x", "retry-after": "4"}, 4.0),
        ({"retry-after-ms": "100", "retry-after": "4"}, 0.1),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past
    ],
)
def test_retry_after_value(headers: dict[str, str], expected: float) -> None:
    assert retry_after_value(headers, 5.0) == pytest.approx(expected)


def test_retry_after_value_reads_a_future_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=60)
    value = retry_after_value({"retry-after": format_datetime(when, usegmt=True)}, 5.0)
    assert 57 <= value <= 60


# --------------------------------------------------------------------------- 402, 400/422, 5xx


def test_402_is_insufficient_quota() -> None:
    error = error_from_upstream(402, {}, ds_error("Insufficient Balance"))
    assert triple(error) == (402, "insufficient_quota", "insufficient_balance")
    assert error.message == "Insufficient Balance"


def test_402_without_body_still_has_a_message() -> None:
    error = error_from_upstream(402, {}, b"")
    assert triple(error) == (402, "insufficient_quota", "insufficient_balance")
    assert error.message


@pytest.mark.parametrize("status", [400, 422])
def test_client_errors_keep_status_upstream_code_and_message(status: int) -> None:
    body = ds_error("Invalid max_tokens value, the valid range is [1, 8192]", "invalid_max_tokens")
    error = error_from_upstream(status, {}, body)
    assert triple(error) == (status, "invalid_request_error", "invalid_max_tokens")
    assert error.message == "Invalid max_tokens value, the valid range is [1, 8192]"


@pytest.mark.parametrize("status", [400, 422])
def test_client_errors_without_upstream_code_get_a_code(status: int) -> None:
    error = error_from_upstream(status, {}, json.dumps({"error": {"message": "bad"}}).encode())
    assert error.status == status
    assert error.code
    assert error.message == "bad"


def test_client_errors_keep_the_upstreams_param() -> None:
    body = json.dumps({"error": {"message": "bad", "code": "x", "param": "temperature"}})
    assert error_from_upstream(400, {}, body.encode()).param == "temperature"
    assert error_from_upstream(422, {}, ds_error("bad")).param is None
    assert error_from_upstream(400, {}, b"not json").param is None


def test_422_with_non_json_body_keeps_the_text() -> None:
    error = error_from_upstream(422, {}, b"unprocessable entity")
    assert triple(error) == (422, "invalid_request_error", "invalid_request_error")
    assert error.message == "unprocessable entity"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_502_upstream_status_n_with_message_kept(status: int) -> None:
    body = ds_error("Server overloaded, please retry later", "server_error")
    error = error_from_upstream(status, {}, body)
    assert triple(error) == (502, "upstream_connection_error", f"upstream_status_{status}")
    assert error.message == "Server overloaded, please retry later"


def test_5xx_with_non_json_body_keeps_the_text() -> None:
    error = error_from_upstream(503, {}, b"  <html>Service Unavailable</html>\n")
    assert triple(error) == (502, "upstream_connection_error", "upstream_status_503")
    assert error.message == "<html>Service Unavailable</html>"


def test_5xx_with_empty_body_has_a_message_naming_the_status() -> None:
    error = error_from_upstream(500, {}, b"")
    assert error.code == "upstream_status_500"
    assert "500" in error.message


def test_5xx_after_the_gateway_retried_tells_the_client_not_to_retry() -> None:
    error = error_from_upstream(503, {"retry-after": "2"}, b"", retried=True)
    assert error.headers == {"x-should-retry": "false"}


def test_5xx_not_retried_passes_the_upstreams_retry_after_on() -> None:
    error = error_from_upstream(503, {"retry-after": "2"}, b"")
    assert error.headers == {"Retry-After": "2", "retry-after-ms": "2000"}
    assert error_from_upstream(500, {}, b"").headers == {}


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_tells_the_client_not_to_retry(status: int) -> None:
    assert error_from_upstream(status, {}, b"").headers["x-should-retry"] == "false"


def test_connect_failure_after_retries_tells_the_client_not_to_retry() -> None:
    exc = UpstreamConnectError("refused")
    assert "x-should-retry" not in client_error_for(exc).headers
    exc.retried = True
    assert client_error_for(exc).headers["x-should-retry"] == "false"


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
def test_a_huge_retry_after_is_passed_on_as_a_day(status: int, header: str) -> None:
    error = error_from_upstream(status, {header: "1e306"}, b"")
    assert error.headers["Retry-After"] == "86400"
    assert error.headers["retry-after-ms"] == "86400000"


def test_an_error_code_of_only_control_characters_falls_back() -> None:
    body = json.dumps({"error": {"code": "\u0000\u0001 ", "message": "m"}}).encode()
    assert error_from_upstream(400, {}, body).code == "invalid_request_error"
    assert upstream_event_error("\x00\x01", "m").code == "upstream_error"


def test_404_is_502_upstream_status_404() -> None:
    error = error_from_upstream(404, {}, b"Not Found")
    assert triple(error) == (502, "upstream_connection_error", "upstream_status_404")
    assert error.headers == {"x-should-retry": "false"}
    body = json.dumps({"error": {"message": "no such model", "param": "model"}}).encode()
    assert error_from_upstream(404, {}, body).param == "model"


@pytest.mark.parametrize("status", [405, 410, 413, 415, 418, 451])
def test_other_4xx_are_502s_the_sdks_do_not_retry(status: int) -> None:
    body = json.dumps({"error": {"message": "too big", "param": "messages"}}).encode()
    error = error_from_upstream(status, {}, body)
    assert triple(error) == (502, "upstream_connection_error", f"upstream_status_{status}")
    assert (error.message, error.param) == ("too big", "messages")
    assert error.headers == {"x-should-retry": "false"}


@pytest.mark.parametrize("status", [408, 409])
def test_408_and_409_stay_retryable(status: int) -> None:
    error = error_from_upstream(status, {}, b"")
    assert error.code == f"upstream_status_{status}"
    assert "x-should-retry" not in error.headers


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"detail": "Model not found"}, "Model not found"),
        (
            {"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "x"}]},
            "body.messages: field required",
        ),
    ],
)
def test_fastapi_shaped_errors_keep_their_message(body: dict[str, Any], message: str) -> None:
    error = error_from_upstream(422, {}, json.dumps(body).encode())
    assert (error.status, error.message) == (422, message)


def test_a_body_in_an_encoding_nobody_asked_for_is_not_the_message() -> None:
    error = error_from_upstream(400, {"content-encoding": "br"}, b"\x0b\x03\x80hello\x03")
    assert error.message == "The upstream rejected the request"
    gzipped = error_from_upstream(400, {"content-encoding": "gzip"}, ds_error("bad field"))
    assert gzipped.message == "bad field"  # inflated by the upstream client already


def test_json_error_string_body_keeps_the_string() -> None:
    error = error_from_upstream(500, {}, json.dumps({"error": "boom"}).encode())
    assert error.message == "boom"


def test_invalid_utf8_body_does_not_raise() -> None:
    error = error_from_upstream(500, {}, b"\xff\xfe bad bytes")
    assert error.code == "upstream_status_500"
    assert "bad bytes" in error.message


@pytest.mark.parametrize("status", [402, 422, 429, 500, 503])
def test_planted_keys_never_reach_the_client(status: int) -> None:
    body = ds_error(f"key {PLANTED} and {GATEWAY_KEY} and Bearer abc.def rejected")
    error = error_from_upstream(status, {}, body, secrets=(GATEWAY_KEY,))
    rendered = json.dumps(error.to_json())
    assert "SECRET123456" not in rendered
    assert GATEWAY_KEY not in rendered
    assert "abc.def" not in rendered
    assert "rejected" in rendered


def test_long_upstream_message_is_bounded() -> None:
    error = error_from_upstream(500, {}, ds_error("x" * 10_000))
    assert len(error.message) <= MAX_MESSAGE


# --------------------------------------------------------------------------- upstream_error_fields


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"code": "c", "message": "m", "param": "p"}}', ("c", "m", "p")),
        (b'{"error": {"code": 7}}', ("7", None, None)),
        (b'{"error": {"code": {"x": 1}, "param": 3}}', (None, None, None)),
        (b'{"code": "c", "message": "m"}', ("c", "m", None)),
        (b'{"error": "text"}', (None, "text", None)),
        (b"[1, 2]", (None, None, None)),
        (b"", (None, None, None)),
        (b"plain text", (None, "plain text", None)),
    ],
)
def test_upstream_error_fields_reads_any_shape(
    body: bytes, expected: tuple[str | None, str | None, str | None]
) -> None:
    assert upstream_error_fields(body) == expected


# --------------------------------------------------------------------------- sanitize_message


def test_sanitize_redacts_a_planted_sk_key() -> None:
    clean = sanitize_message(f"Your api key {PLANTED} is invalid")
    assert "SECRET123456" not in clean
    assert "sk-test" not in clean
    assert clean.startswith("Your api key ")
    assert clean.endswith(" is invalid")


def test_sanitize_redacts_a_key_that_contains_another_whole() -> None:
    cleaned = sanitize_message("echo mainkey-XYZ2 and mainkey", ("mainkey", "mainkey-XYZ2"))
    assert cleaned == "echo [redacted] and [redacted]"


def test_sanitize_redacts_the_secrets_argument_verbatim() -> None:
    clean = sanitize_message(f"upstream saw {GATEWAY_KEY}!", secrets=(GATEWAY_KEY, ""))
    assert GATEWAY_KEY not in clean
    assert clean.startswith("upstream saw ")
    assert clean.endswith("!")


def test_sanitize_redacts_bearer_tokens_and_masked_keys() -> None:
    clean = sanitize_message("header Bearer tok_123 and key ****abcd")
    assert "tok_123" not in clean
    assert "abcd" not in clean


KEY = "sk-UPSTREAMSECRET1234"
POOL_KEY = "ohk-POOLHOSTKEY777"


@pytest.mark.parametrize(
    "echo",
    [
        "Incorrect API key provided: sk-UPSTREAM...1234",
        "key ending in CRET1234",
        "key starting sk-UPSTR",
        "UPSTREAMSECRET1234 is not a valid key",
        "SK-UPSTREAMSECRET1234",
        "bearer SK-UPSTREAMSECRET1234",
        "sk-UPSTREA\nMSECRET1234",
        "sk-UPSTREA\u200bMSECRET1234",
        "pool host key ohk-POOLHOST...KEY777 refused",
        "OHK-POOLHOSTKEY777",
    ],
)
def test_sanitize_redacts_runs_of_a_key_in_any_case(echo: str) -> None:
    clean = sanitize_message(f"error: {echo}.", (KEY, POOL_KEY))
    lowered = clean.lower()
    for secret in (KEY, POOL_KEY):
        key = secret.lower()
        runs = {key[i : i + 8] for i in range(len(key) - 7)}
        assert not any(run in lowered for run in runs), clean
    assert clean.startswith("error: ")
    assert "[redacted]" in clean


def test_sanitize_keeps_text_that_shares_less_than_a_run_with_a_key() -> None:
    text = "Rate limit for sk-UPS... reached; retry in 1234 ms"
    assert sanitize_message(text, (KEY,)) == text


def test_sanitize_keeps_ordinary_text() -> None:
    text = "Invalid model 'deepseek-chat-x': skip-this is fine"
    assert sanitize_message(text) == text


def test_sanitize_bounds_the_length() -> None:
    clean = sanitize_message("a" * 5000)
    assert len(clean) == MAX_MESSAGE
    assert clean.endswith("\u2026")
    assert sanitize_message("a" * MAX_MESSAGE) == "a" * MAX_MESSAGE


def test_sanitize_redacts_before_truncating() -> None:
    text = "a" * (MAX_MESSAGE - 10) + PLANTED
    assert "SECRET" not in sanitize_message(text)
    assert "sk-test-S" not in sanitize_message(text)


def test_sanitize_replaces_control_characters() -> None:
    assert sanitize_message("a\x00b\x1bc\x7fd") == "a b c d"


# --------------------------------------------------------------------------- stream errors


def test_broken_error_is_502_stream_broken() -> None:
    error = broken_error()
    assert triple(error) == (502, "upstream_connection_error", "upstream_stream_broken")
    assert error.message == "Upstream SSE connection closed unexpectedly"


def test_broken_error_timeout_is_504_upstream_timeout() -> None:
    assert triple(broken_error("slow", timeout=True)) == (
        504,
        "upstream_connection_error",
        "upstream_timeout",
    )


def test_upstream_event_error_is_502_with_code_and_sanitized_message() -> None:
    error = upstream_event_error("content_filter", f"blocked {GATEWAY_KEY}", (GATEWAY_KEY,))
    assert triple(error) == (502, "upstream_error", "content_filter")
    assert GATEWAY_KEY not in error.message
    assert error.message.startswith("blocked")
