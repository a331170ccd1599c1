"""Logging: one JSON object per line on stdout.

`configure()` is called once by the CLI. Records carry their structured fields in `extra`;
the formatter writes them next to the message. No message content and no keys are ever passed
in (callers log key hashes only), so nothing here needs to redact.

`info()` is for lines written once per request (the access line): it builds the record
without the caller lookup `Logger.info` does, which none of these lines print.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ds2oai import jsonutil

__all__ = ["JSONFormatter", "configure", "info"]

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # Lines come in bursts within one second: its text is formatted once.
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
        return jsonutil.dumps(entry).decode()


def info(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg, extra=fields)` without the stack walk for the caller's file and line."""
    if logger.isEnabledFor(logging.INFO):
        logger.handle(
            logger.makeRecord(logger.name, logging.INFO, "", 0, msg, (), None, None, fields)
        )


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True  # we write our own request line
    # The formatter prints none of these; LogRecord would look them up for every line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
