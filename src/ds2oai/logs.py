"""Logging: one JSON object per line on stdout.

`configure()` is called once by the CLI. Records carry their structured fields in `extra`;
the formatter writes every one of them next to the message. No message content and no keys
are ever passed in (callers log key hashes only), so nothing here needs to redact.

`info()` is for lines written once per request (the access line). When the line's only
destination is the `JSONHandler` that `configure()` installed, formatting with its own
`JSONFormatter` (no other handler, no filter on the way, the default logger and record
classes), it writes the line straight from its fields: the same JSON a record would give,
without building the `LogRecord` (about 80 k instructions a line). Otherwise it builds the
record (without the caller lookup `Logger.info` does, which no line prints) and hands it to
the logging module as usual, so `caplog`, a handler or a record factory a user adds sees every
line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from logging import LogRecord
from types import TracebackType
from typing import Any, TextIO

from ds2oai import jsonutil

__all__ = ["JSONFormatter", "JSONHandler", "configure", "info", "where"]

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # Lines come in bursts within one second: its text is formatted once. One tuple, so
        # a thread switch between two lines never pairs one second with another's text.
        self._second: tuple[int, str] = (-1, "")

    def stamp(self, created: float, msecs: float) -> str:
        second, text = self._second
        if second != int(created):
            second = int(created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.stamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc_where"] = where(record.exc_info[2])
        return jsonutil.dumps(entry).decode()


def where(tb: TracebackType | None, frames: int = 8) -> list[str]:
    """Where an exception was raised, innermost last: `dir/file.py:line function` for its last
    `frames` frames. Never the exception's message, which may carry message content or a
    key an upstream echoed; file, line and function name say where to look."""
    out: list[str] = []
    for frame, line in traceback.walk_tb(tb):
        code = frame.f_code
        path = code.co_filename.replace(os.sep, "/").rsplit("/", 2)
        out.append(f"{'/'.join(path[-2:])}:{line} {code.co_name}")
    return out[-frames:]


class JSONHandler(logging.StreamHandler[TextIO]):
    """One JSON object per line on `stream`, formatted by `JSONFormatter`."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.json = JSONFormatter()
        self.setFormatter(self.json)

    def write_fields(self, name: str, msg: str, fields: dict[str, Any]) -> None:
        """Write what an INFO record of logger `name` with `msg` and `extra=fields` would give
        (`info()` checks that it would: no reserved field names, the default record class)."""
        created = time.time()
        entry: dict[str, Any] = {
            # the time as `LogRecord` takes it
            "ts": self.json.stamp(created, (created - int(created)) * 1000),
            "level": logging.getLevelName(logging.INFO).lower(),
            "logger": name,
            "msg": msg,
        }
        entry.update(fields)
        line = jsonutil.dumps(entry).decode() + self.terminator
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            self.stream.write(line)
            self.flush()


def _sole_handler(logger: logging.Logger) -> JSONHandler | None:
    """The handler an INFO record of `logger` would reach, if it is one `JSONHandler` that
    formats with its own `JSONFormatter`, and nothing else would see or change the record."""
    if type(logger) is not logging.Logger or logging.getLogRecordFactory() is not LogRecord:
        return None  # a subclass or a factory may build or route records its own way
    found: JSONHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or type(handler) is not JSONHandler or handler.filters:
                return None
            if handler.level > logging.INFO or handler.formatter is not handler.json:
                return None
            found = handler
        current = current.parent if current.propagate else None
    return found


def _record(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, "", 0, msg, (), None, None, fields)


def info(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg, extra=fields)` for a line written once per request."""
    if not logger.isEnabledFor(logging.INFO) or logger.disabled:
        return
    handler = _sole_handler(logger)
    if handler is None or not _STANDARD.isdisjoint(fields):  # the record path raises for those
        logger.handle(_record(logger, msg, fields))
        return
    try:
        handler.write_fields(logger.name, msg, fields)
    except Exception:
        handler.handleError(_record(logger, msg, fields))  # as StreamHandler.emit does


def configure(level: str = "info") -> None:
    handler = JSONHandler(sys.stdout)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True  # we write our own request line
    # The formatter prints none of these; LogRecord would look them up for every line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
