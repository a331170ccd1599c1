"""The JSON log formatter and the access line's record path (sans-IO)."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

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
    # ... and where it was raised, so a middleware's author can find it.
    assert line["exc_where"] == ["tests/test_logs.py:58 test_an_exception_is_named_not_dumped"]


FIELDS = {"request_id": "abc", "status": 200, "upstream_statuses": [200], "key_id": None}
Sole = tuple[logging.Logger, logs.JSONHandler, io.StringIO]


@pytest.fixture
def sole() -> Iterator[Sole]:
    """A logger whose only destination is one `JSONHandler`, as `configure()` sets up.

    Tests take it through `only()`: pytest attaches its capture handlers to non-propagating
    loggers too when the test's call phase starts, and with them there the record path runs.
    """
    stream = io.StringIO()
    handler = logs.JSONHandler(stream)
    logger = logging.getLogger("ds2oai.test_logs")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, handler, stream
    logger.handlers[:] = []
    logger.filters[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def only(sole: Sole) -> Sole:
    """`sole` with pytest's capture handlers taken off again (see the fixture)."""
    logger, handler, _stream = sole
    logger.handlers[:] = [handler]
    return sole


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _without_ts(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k != "ts"}


def test_the_direct_line_is_the_line_a_record_gives(
    sole: Sole,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, _handler, stream = only(sole)
    logger.info("request", extra=FIELDS)
    with monkeypatch.context() as m:  # the direct path builds no record at all
        m.setattr(logging.Logger, "makeRecord", _no_record)
        logs.info(logger, "request", FIELDS)
    by_record, direct = _lines(stream)
    assert list(direct) == list(by_record)  # same keys, same order
    assert _without_ts(direct) == _without_ts(by_record)
    assert direct["ts"][:-5] == by_record["ts"][:-5]  # to the second (the same one, or close)
    assert direct["ts"].endswith("Z")


def _no_record(*_args: object, **_kwargs: object) -> logging.LogRecord:
    raise AssertionError("the sole-handler path made a LogRecord")


def test_another_handler_on_the_way_gets_the_record(
    sole: Sole,
) -> None:
    logger, handler, stream = sole
    seen: list[logging.LogRecord] = []

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger.handlers[:] = [handler, Collector()]
    logs.info(logger, "request", FIELDS)
    assert [record.__dict__["request_id"] for record in seen] == ["abc"]
    assert _without_ts(_lines(stream)[0]) == {
        "level": "info",
        "logger": "ds2oai.test_logs",
        "msg": "request",
        **FIELDS,
    }


def test_a_filter_on_the_way_still_decides(
    sole: Sole,
) -> None:
    logger, _handler, stream = only(sole)
    logger.addFilter(lambda record: record.__dict__.get("request_id") != "abc")
    logs.info(logger, "request", FIELDS)
    logs.info(logger, "request", {**FIELDS, "request_id": "xyz"})
    assert [line["request_id"] for line in _lines(stream)] == ["xyz"]


def test_info_writes_nothing_below_the_logger_or_handler_level(
    sole: Sole,
) -> None:
    logger, handler, stream = only(sole)
    logger.setLevel(logging.WARNING)
    logs.info(logger, "request", FIELDS)
    logger.setLevel(logging.INFO)
    handler.setLevel(logging.WARNING)
    logs.info(logger, "request", FIELDS)
    assert stream.getvalue() == ""


def test_a_failing_stream_is_reported_like_logging_does(
    sole: Sole,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, handler, _stream = only(sole)

    class Broken(io.StringIO):
        def write(self, _text: str) -> int:
            raise BrokenPipeError("reader gone")

    handler.setStream(Broken())
    reported: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", reported.append)
    logs.info(logger, "request", FIELDS)  # does not raise
    assert [record.getMessage() for record in reported] == ["request"]


def test_a_record_factory_or_another_formatter_gets_the_record(
    sole: Sole,
) -> None:
    logger, handler, stream = only(sole)
    default = logging.getLogRecordFactory()

    def with_trace(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = default(*args, **kwargs)
        record.trace_id = "t-1"
        return record

    logging.setLogRecordFactory(with_trace)
    try:
        logs.info(logger, "request", FIELDS)
    finally:
        logging.setLogRecordFactory(default)
    assert _lines(stream)[0]["trace_id"] == "t-1"
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logs.info(logger, "request", FIELDS)
    assert stream.getvalue().splitlines()[1] == "INFO request"


def test_a_reserved_field_name_raises_as_logging_does(
    sole: Sole,
) -> None:
    logger, _handler, stream = only(sole)
    with pytest.raises(KeyError, match="name"):
        logger.info("request", extra={"name": "x"})
    with pytest.raises(KeyError, match="name"):
        logs.info(logger, "request", {"name": "x"})
    assert stream.getvalue() == ""


def test_a_stream_without_flush_is_written_as_logging_writes_it(
    sole: Sole,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, handler, _stream = only(sole)
    errors: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", errors.append)
    written: list[str] = []

    class NoFlush:
        def write(self, text: str) -> int:
            written.append(text)
            return len(text)

    handler.setStream(NoFlush())  # type: ignore[arg-type]  # a stream with write() only
    logs.info(logger, "request", FIELDS)
    assert json.loads(written[0])["request_id"] == "abc"
    assert errors == []
