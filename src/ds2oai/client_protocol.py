"""The upstream connections' protocol: aiohttp's `ResponseHandler`, minus two per-read costs.

Sits under `upstream.UpstreamClient`, which builds its `TCPConnector` with `connector()`. It
changes only how often aiohttp does its per-read bookkeeping, never what is read or when a read
fails:

- aiohttp 3.14 calls `resume_reading()` for every HTTP chunk a reader takes out of its buffer,
  which re-enters `data_received(b"")` and the transport even when nothing was paused. DeepSeek
  sends one chunk per SSE event, so that is once per event. Here it is skipped until the
  response's reading is first paused, and runs on every call after that: the parser can only
  hold unparsed bytes once `pause_reading()` was called, and its pause flag can outlive the
  pause (set from a chunk-end callback, it is only cleared by the next body callback, which then
  stops at the first chunk and keeps the rest for the next `resume_reading()`).
- The `sock_read` timer (`upstream.read_timeout`) is cancelled and created again on every read.
  Here it is armed once and, when it fires, armed again for the rest of the silence if data came
  in the meantime (the lazy idle timer of libuv and Go): the same deadline (within a
  millisecond: uvloop's timers and clock have that resolution), one timer per timeout period
  instead of one per read.

Both use aiohttp internals (`TCPConnector._factory`, `ResponseHandler`'s pause flag and timer
attributes). Where they are not there (another aiohttp), `connector()` keeps aiohttp's own
protocol, so only the speed changes; `installed()` says which one a connector uses, and the
tests check it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler as _AiohttpHandler

__all__ = ["ResponseHandler", "connector", "installed"]

# What the overrides below call, replace or read; all present in aiohttp 3.14.
_METHODS = (
    "pause_reading",
    "resume_reading",
    "set_response_params",
    "_reschedule_timeout",
    "_drop_timeout",
    "_on_read_timeout",
)
_ATTRIBUTES = ("_reading_paused", "_read_timeout", "_read_timeout_handle", "_loop")
# uvloop rounds timer delays to milliseconds and its clock has that resolution: a deadline
# closer than this counts as reached, instead of re-arming a zero-delay timer until it ticks.
_CLOCK_SLACK = 0.001


class ResponseHandler(_AiohttpHandler):
    """aiohttp's client protocol with a resume skipped when nothing was paused and a lazy
    `sock_read` timer; everything else is aiohttp's."""

    _read_deadline = 0.0  # silence past this moment is a read timeout
    _read_armed_for = 0.0  # when the armed timer fires
    _paused_once = False  # this response's reading was paused at least once

    def set_response_params(self, **kwargs: Any) -> None:
        self._paused_once = False  # a new response gets a new parser
        super().set_response_params(**kwargs)

    def pause_reading(self) -> None:
        self._paused_once = True
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._paused_once or self._reading_paused:
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
        if self._read_deadline - self._loop.time() > _CLOCK_SLACK:  # data came after arming
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
        and _compatible(factory())
    ):
        make: type[_AiohttpHandler] = ResponseHandler
        conn._factory = functools.partial(make, *factory.args, **factory.keywords)
    return conn


def _compatible(probe: _AiohttpHandler) -> bool:
    """Whether aiohttp's protocol has what `ResponseHandler` relies on (checked on an unused
    instance: the attributes are set in `__init__`)."""
    if not all(callable(getattr(probe, name, None)) for name in _METHODS):
        return False
    if not all(hasattr(probe, name) for name in _ATTRIBUTES):
        return False
    return "resume_parser" in inspect.signature(probe.resume_reading).parameters


def installed(conn: aiohttp.TCPConnector) -> bool:
    """Whether `conn` makes its connections with this module's `ResponseHandler`."""
    factory = getattr(conn, "_factory", None)
    return isinstance(factory, functools.partial) and factory.func is ResponseHandler
