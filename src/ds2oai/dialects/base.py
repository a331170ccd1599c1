"""The state machine the chunk-by-chunk dialects share (spec and OpenAI chat).

States: WAITING (nothing sent) -> STREAMING (the first chunk went out) -> FINISHING (a
finish_reason was seen; waiting for `[DONE]` or the end of the body, usage may still come) ->
ENDED. This class turns every upstream event into one of six hooks — `_chunk`, `_text`,
`_reasoning` and `_arguments` (the byte-level forms of a plain text, reasoning or tool-call
arguments chunk), `_completed`, `_error` —
so a dialect only says how each looks on its wire. A stream completes only after a
finish_reason; once FINISHING, a broken body still completes (the answer is whole, only `[DONE]`
or a late usage chunk is lost); nothing is emitted after ENDED.
"""

from __future__ import annotations

import enum

from ds2oai.events import (
    ArgumentsDelta,
    Chunk,
    Done,
    EndOfBody,
    ReasoningDelta,
    StreamBroken,
    TextDelta,
    UpstreamErrorEvent,
    UpstreamEvent,
)
from ds2oai.upstream_errors import BROKEN_MESSAGE

__all__ = ["ChunkDialect", "State"]


class State(enum.Enum):
    WAITING = 0
    STREAMING = 1
    FINISHING = 2
    ENDED = 3


_STREAMING = State.STREAMING  # read per text chunk: a module global, not a class attribute


class ChunkDialect:
    media_type = "text/event-stream"
    # Takes `TextDelta`, `ReasoningDelta` and `ArgumentsDelta` (a text, thinking or tool-call
    # arguments chunk as the upstream's JSON string literal) via `_text`, `_reasoning` and
    # `_arguments`.
    text_literals = True

    __slots__ = ("_outcome", "_state")

    def __init__(self) -> None:
        self._state = State.WAITING
        self._outcome: str | None = None

    @property
    def outcome(self) -> str | None:
        return self._outcome

    def feed(self, event: UpstreamEvent) -> bytes:
        if self._state is State.ENDED:
            return b""
        if type(event) is TextDelta:
            # Only ever after a full chunk (the template is learned from one): STREAMING or
            # FINISHING, where the text no longer counts.
            return self._text(event.literals) if self._state is State.STREAMING else b""
        if isinstance(event, Chunk):
            return self._chunk(event)
        if type(event) is ReasoningDelta:
            return self._reasoning(event.literals) if self._state is State.STREAMING else b""
        if type(event) is ArgumentsDelta:
            if self._state is not State.STREAMING:
                return b""
            return self._arguments(event.index, event.literals)
        if isinstance(event, Done | EndOfBody):
            if self._state is State.FINISHING:
                return self._end_completed()
            return self._end_error("upstream_broken", "upstream_stream_broken", BROKEN_MESSAGE)
        if isinstance(event, UpstreamErrorEvent):
            return self._end_error("upstream_error", "upstream_error", event.message, event.code)
        if isinstance(event, StreamBroken):
            if self._state is State.FINISHING:
                return self._end_completed()
            outcome = "timeout" if event.timeout else "upstream_broken"
            return self._end_error(outcome, "upstream_stream_broken", event.message)
        raise TypeError(f"unknown upstream event {event!r}")  # pragma: no cover

    def feed_text(self, literal: bytes) -> bytes:
        return self._text([literal]) if self._state is _STREAMING else b""

    def feed_reasoning(self, literal: bytes) -> bytes:
        return self._reasoning([literal]) if self._state is _STREAMING else b""

    def feed_arguments(self, index: int, literal: bytes) -> bytes:
        return self._arguments(index, [literal]) if self._state is _STREAMING else b""

    def fail(self, type_: str, code: str, message: str) -> bytes:
        if self._state is State.ENDED:
            # The chat-shaped error events carry no state: an ended dialect writes one too.
            return self._error("upstream_broken", type_, message, code)
        return self._end_error("upstream_broken", type_, message, code)

    def _end_completed(self) -> bytes:
        self._state = State.ENDED
        self._outcome = "completed"
        return self._completed()

    def _end_error(self, outcome: str, type_: str, message: str, code: str | None = None) -> bytes:
        self._state = State.ENDED
        self._outcome = outcome
        return self._error(outcome, type_, message, code)

    # -- what each dialect writes

    def _chunk(self, chunk: Chunk) -> bytes:
        raise NotImplementedError

    def _text(self, literals: list[bytes]) -> bytes:
        """Plain text chunks, each text given as a valid JSON string literal."""
        raise NotImplementedError

    def _reasoning(self, literals: list[bytes]) -> bytes:
        """Plain reasoning chunks, each `reasoning_content` given as a valid JSON string
        literal."""
        raise NotImplementedError

    def _arguments(self, index: int, literals: list[bytes]) -> bytes:
        """Chunks holding only a fragment of tool call `index`'s arguments, each fragment a
        valid JSON string literal."""
        raise NotImplementedError

    def _completed(self) -> bytes:
        raise NotImplementedError

    def _error(self, outcome: str, type_: str, message: str, code: str | None) -> bytes:
        raise NotImplementedError
