"""The JSON log formatter and the access line's record path (sans-IO)."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest

from ds2oai import logs


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "ds2oai.t", "levelno": 20, "levelname": "INFO"})
    record.msg = "hello %s"
    record.args = ("there",)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    record.__dict__.update(extra)
    return record


def test_a_line_has_time_level_logger_message_and_every_extra_field() -> None:
    created = 1_780_000_000.125
    line = json.loads(logs.JSONFormatter().format(_record(created, request_id="r1", status=200)))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    assert line == {
        "ts": f"{stamp}.125Z",
        "level": "info",
        "logger": "ds2oai.t",
        "msg": "hello there",
        "request_id": "r1",
        "status": 200,
    }


def test_the_time_follows_each_record_across_seconds() -> None:
    formatter = logs.JSONFormatter()
    stamps = [
        json.loads(formatter.format(_record(created)))["ts"]
        for created in (1_780_000_000.5, 1_780_000_000.9, 1_780_000_061.25, 1_780_000_000.0)
    ]
    expected = [
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(c))) + f".{ms}Z"
        for c, ms in ((1_780_000_000, "500"), (1_780_000_000, "900"), (1_780_000_061, "250"))
    ]
    assert stamps[:3] == expected
    assert stamps[3] == expected[0][:-4] + "000Z"


def test_an_exception_is_named_not_dumped() -> None:
    try:
        raise KeyError("secret-looking detail")
    except KeyError:
        record = logging.LogRecord("ds2oai.t", 40, "", 0, "failed", (), sys.exc_info())
    line = json.loads(logs.JSONFormatter().format(record))
    assert line["exc_type"] == "KeyError"
    assert "secret-looking detail" not in json.dumps(line)


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    logger = logging.getLogger("ds2oai.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    return logger, stream


def test_info_writes_the_fields_like_logger_info(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.setLevel(logging.INFO)
    logs.info(logger, "request", {"request_id": "abc", "upstream_statuses": [200]})
    logger.info("request", extra={"request_id": "abc", "upstream_statuses": [200]})
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "request"
    assert first["request_id"] == "abc"
    assert {k: v for k, v in first.items() if k != "ts"} == {
        k: v for k, v in second.items() if k != "ts"
    }


def test_info_writes_nothing_below_its_level(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.setLevel(logging.WARNING)
    logs.info(logger, "request", {"request_id": "abc"})
    assert stream.getvalue() == ""
