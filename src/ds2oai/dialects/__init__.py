"""Dialects: sans-IO state machines from normalized upstream events to one wire format.

A dialect is created per request, fed `UpstreamEvent`s in order, and returns the bytes to
write for each (often `b""`). It has explicit terminal states: once `outcome` is set it emits
nothing more. The reframe stage (middleware/reframe.py) drives it; nothing here does I/O.
"""

from __future__ import annotations

from typing import Protocol

from ds2oai.events import UpstreamEvent

__all__ = ["OUTCOMES", "Dialect"]

# Stream outcomes, as counted by metrics and written in logs.
OUTCOMES = ("completed", "upstream_broken", "upstream_error", "timeout", "client_cancelled")


class Dialect(Protocol):
    media_type: str
    # True: may be fed `TextDelta`, `ReasoningDelta` and `ArgumentsDelta` (the byte-level forms
    # of a plain text, reasoning or tool-call arguments chunk) once it has seen a full `Chunk`;
    # False: only ever gets parsed events.
    text_literals: bool

    @property
    def outcome(self) -> str | None:
        """None while the stream is open; one of OUTCOMES (except client_cancelled) after."""

    def feed(self, event: UpstreamEvent) -> bytes:
        """The bytes this event produces downstream (b"" for none). No-op after the end."""

    def feed_text(self, literal: bytes) -> bytes:
        """`feed(TextDelta([literal]))` without building the event: the hot path of a paced
        stream. Only called on a dialect with `text_literals`."""

    def feed_reasoning(self, literal: bytes) -> bytes:
        """`feed(ReasoningDelta([literal]))` without building the event, as `feed_text`."""

    def feed_arguments(self, index: int, literal: bytes) -> bytes:
        """`feed(ArgumentsDelta(index, [literal]))` without building the event, as
        `feed_text`."""

    def fail(self, type_: str, code: str, message: str) -> bytes:
        """End the stream now with the gateway's own error (a stage failed after the head went
        out): the terminal error bytes, outcome `upstream_broken`. Called only while the
        client has no terminal event (one made but lost on the way still counts as none)."""
