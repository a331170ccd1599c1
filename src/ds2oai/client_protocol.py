"""The upstream connections' protocol: aiohttp's `ResponseHandler`, minus two per-read costs.

Sits under `upstream.UpstreamClient`, which builds its `TCPConnector` with `connector()`. It
changes only how often aiohttp does its per-read bookkeeping, never what is read or when a read
fails:

- aiohttp 3.14 calls `resume_reading()` for every HTTP chunk a reader takes out of its buffer,
  which re-enters `data_received(b"")` and the transport even when nothing was paused. DeepSeek
  sends one chunk per SSE event, so that is once per event. Here it runs only when reading was
  paused, as in aiohttp 3.13: the parser only holds unparsed bytes after `pause_reading()`.
- The `sock_read` timer (`upstream.read_timeout`) is cancelled and created again on every read.
  Here it is armed once and, when it fires, armed again for the rest of the silence if data came
  in the meantime (the lazy idle timer of libuv and Go): the same deadline, one timer per
  timeout period instead of one per read.

Both use aiohttp internals (`TCPConnector._factory` and `ResponseHandler`'s timer attributes).
Where they are not there (another aiohttp), `connector()` keeps aiohttp's own protocol, so only
the speed changes; `installed()` says which one a connector uses, and the tests check it.
"""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler as _AiohttpHandler

__all__ = ["ResponseHandler", "connector", "installed"]

# What the overrides below call or replace; all present in aiohttp 3.14.
_METHODS = ("resume_reading", "_reschedule_timeout", "_drop_timeout", "_on_read_timeout")


class ResponseHandler(_AiohttpHandler):
    """aiohttp's client protocol with a resume skipped when nothing was paused and a lazy
    `sock_read` timer; everything else is aiohttp's."""

    _read_deadline = 0.0  # silence past this moment is a read timeout
    _read_armed_for = 0.0  # when the armed timer fires

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        self._read_deadline = deadline = self._loop.time() + timeout
        handle = self._read_timeout_handle
        if handle is not None and deadline >= self._read_armed_for:
            return  # fires first, then re-arms for what is left
        if handle is not None:  # a shorter timeout than the one armed (a reused connection)
            handle.cancel()
        self._arm(deadline)

    def _arm(self, when: float) -> None:
        self._read_armed_for = when
        self._read_timeout_handle = self._loop.call_at(when, self._read_timer_fired)

    def _read_timer_fired(self) -> None:
        if self._loop.time() < self._read_deadline:  # data came after it was armed
            self._arm(self._read_deadline)
            return
        self._read_timeout_handle = None
        self._on_read_timeout()


def connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """`aiohttp.TCPConnector(**kwargs)` making its connections with `ResponseHandler` when this
    aiohttp has what that class relies on, with aiohttp's own protocol otherwise."""
    conn = aiohttp.TCPConnector(**kwargs)
    factory = getattr(conn, "_factory", None)
    if (
        isinstance(factory, functools.partial)
        and factory.func is _AiohttpHandler
        and all(callable(getattr(_AiohttpHandler, name, None)) for name in _METHODS)
    ):
        make: type[_AiohttpHandler] = ResponseHandler
        conn._factory = functools.partial(make, *factory.args, **factory.keywords)
    return conn


def installed(conn: aiohttp.TCPConnector) -> bool:
    """Whether `conn` makes its connections with this module's `ResponseHandler`."""
    factory = getattr(conn, "_factory", None)
    return isinstance(factory, functools.partial) and factory.func is ResponseHandler
