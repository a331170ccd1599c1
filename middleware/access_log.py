"""`access_log` — one line per finished response, written when the body is done (`AccessLog`).

Reads: the reply status and every body item on its way out. Changes: nothing the client sees;
it wraps `reply.body` in a new async iterator that counts bytes and closes the source in
`finally`. Position: anywhere; placed first it also records the errors other stages raise
(status and error type). Fails: a write error on the log file is reported on the
`ds2oai.extra.access_log` logger and never breaks the response.

    [middleware]
    chain = ["middleware.access_log:AccessLog", "auth", "rate_limit", "retry", "reframe"]
    [middleware.access_log]
    path = "access.jsonl"       # omit to log through Python logging instead
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ds2oai.chain import Body, Exchange, Next, Reply
from ds2oai.errors import ClientError, GatewayError

__all__ = ["AccessLog"]

log = logging.getLogger("ds2oai.extra.access_log")


class AccessLog:
    name = "access_log"

    def __init__(self, path: str | None = None) -> None:
        self._path = path

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        started = time.monotonic()
        try:
            reply = await call_next(exchange)
        except GatewayError as exc:
            status = exc.status if isinstance(exc, ClientError) else None
            self._write(exchange, started, status=status, nbytes=0, error=type(exc).__name__)
            raise
        if isinstance(reply.body, bytes):
            self._write(exchange, started, status=reply.status, nbytes=len(reply.body))
            return reply
        wrapped = self._count(exchange, reply, reply.body, started)
        return Reply(reply.status, reply.headers, wrapped, from_upstream=reply.from_upstream)

    async def _count(self, exchange: Exchange, reply: Reply, source: Body, started: float) -> Body:
        nbytes = 0
        try:
            async for data in source:
                nbytes += len(data)
                yield data
        finally:
            await source.aclose()
            self._write(exchange, started, status=reply.status, nbytes=nbytes)

    def _write(
        self,
        exchange: Exchange,
        started: float,
        *,
        status: int | None,
        nbytes: int,
        error: str | None = None,
    ) -> None:
        entry: dict[str, Any] = {
            "request_id": exchange.request_id,
            "route": exchange.route,
            "model": exchange.exposed_model,
            "status": status,
            "bytes": nbytes,
            "outcome": exchange.trace.outcome,
            "error": error,
            "seconds": round(time.monotonic() - started, 4),
        }
        if self._path is None:
            log.info("access", extra=entry)
            return
        try:
            with open(self._path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        except OSError as exc:
            log.warning("cannot write access log", extra={"path": self._path, "error": str(exc)})
