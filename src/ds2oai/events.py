"""The normalized event model between the upstream reader and the dialects.

`parse_upstream_event()` turns one upstream SSE `data` payload into exactly one of `Chunk`,
`UpstreamErrorEvent` or `Done`, or raises `MalformedChunk`; it tolerates missing or empty
`choices`, `null` content and extra fields. `TextDelta` is the byte-level short form of a plain
text `Chunk` (see `chunk_template`), `ReasoningDelta` that of a plain reasoning one and
`ArgumentsDelta` that of a chunk holding only a tool call's arguments fragment. The end of the
upstream body and its failures are given to the dialects as `EndOfBody` and `StreamBroken`.
Pure data; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ds2oai import jsonutil

__all__ = [
    "ArgumentsDelta",
    "Chunk",
    "Done",
    "EndOfBody",
    "MalformedChunk",
    "ReasoningDelta",
    "StreamBroken",
    "TextDelta",
    "ToolCallDelta",
    "UpstreamErrorEvent",
    "UpstreamEvent",
    "choice_delta",
    "error_code",
    "parse_upstream_event",
]


class MalformedChunk(ValueError):
    """An upstream `data:` payload that is not a JSON object (skipped and logged, never fatal)."""


# Not frozen: built per upstream chunk on the hot path (frozen dataclasses cost 3x to build).
# Treat every event as immutable all the same.
@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(slots=True)
class Chunk:
    """One `chat.completion.chunk`, reduced to what the dialects use (`raw` keeps the rest)."""

    id: str
    created: int
    model: str
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    has_choice: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The choice's `logprobs` (when the client asked for them), passed on as sent.
    logprobs: Any = None


@dataclass(slots=True)
class TextDelta:
    """Consecutive plain text chunks that repeat the stream's learned template
    (`chunk_template`) except for their text, each text given as the upstream's own JSON
    string literal (already validated)."""

    literals: list[bytes]


@dataclass(slots=True)
class ReasoningDelta:
    """`TextDelta` for a reasoning model's thinking: consecutive plain reasoning chunks that
    repeat the stream's learned reasoning template except for their `reasoning_content`."""

    literals: list[bytes]


@dataclass(slots=True)
class ArgumentsDelta:
    """`TextDelta` for a tool call's arguments: consecutive chunks that repeat the stream's
    learned arguments template (one call, its `index`) except for their fragment."""

    index: int
    literals: list[bytes]


@dataclass(frozen=True, slots=True)
class UpstreamErrorEvent:
    """`data: {"error": {...}}` sent by the upstream inside a stream."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Done:
    """`data: [DONE]`."""


@dataclass(frozen=True, slots=True)
class EndOfBody:
    """The upstream body ended cleanly (chunked terminator or EOF with a length)."""


@dataclass(frozen=True, slots=True)
class StreamBroken:
    """The upstream body broke: reset, truncation, silence (`timeout`)."""

    message: str
    timeout: bool = False


UpstreamEvent = (
    Chunk
    | TextDelta
    | ReasoningDelta
    | ArgumentsDelta
    | UpstreamErrorEvent
    | Done
    | EndOfBody
    | StreamBroken
)

_DONE = Done()


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def error_code(value: Any) -> str | None:
    """An upstream error's code as a string: a non-empty string or an integer, else none."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _tool_calls(value: Any) -> tuple[ToolCallDelta, ...]:
    if not isinstance(value, list):
        return ()
    calls = []
    for position, item in enumerate(value):
        if not isinstance(item, dict):
            continue
        fn = item.get("function")
        fn = fn if isinstance(fn, dict) else {}
        index = item.get("index")
        calls.append(
            ToolCallDelta(
                index=index if isinstance(index, int) and not isinstance(index, bool) else position,
                id=_str_or_none(item.get("id")),
                name=_str_or_none(fn.get("name")),
                arguments=_str_or_none(fn.get("arguments")),
            )
        )
    return tuple(calls)


def choice_delta(choice: dict[str, Any]) -> Any:
    """Where a choice's text is: its `delta`, or its `message` when `delta` is not an object
    (a non-stream shaped chunk, tolerated). Not checked further: the caller decides."""
    d = choice.get("delta")
    return d if isinstance(d, dict) else choice.get("message")


def parse_upstream_event(data: str) -> Chunk | UpstreamErrorEvent | Done:
    """Normalize one upstream SSE data payload."""
    if data.startswith("[DONE]"):
        return _DONE
    try:
        obj = jsonutil.loads(data)
    except jsonutil.JSONDecodeError:
        raise MalformedChunk("upstream chunk is not valid JSON") from None
    if not isinstance(obj, dict):
        raise MalformedChunk("upstream chunk is not a JSON object")
    error = obj.get("error")
    if error:
        if isinstance(error, dict):
            code = (
                error_code(error.get("code")) or error_code(error.get("type")) or "upstream_error"
            )
            message = error.get("message") or "Upstream reported an error"
            return UpstreamErrorEvent(code, str(message))
        return UpstreamErrorEvent("upstream_error", str(error))
    choices = obj.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    delta: dict[str, Any] = {}
    finish: str | None = None
    logprobs: Any = None
    if not isinstance(choice, dict):
        choice = None
    else:
        logprobs = choice.get("logprobs")
        d = choice_delta(choice)
        delta = d if isinstance(d, dict) else {}
        # "" is no finish: some OpenAI-compatible servers send it on every chunk.
        finish = choice.get("finish_reason") or None
        if type(finish) is not str:
            finish = None
    usage = obj.get("usage")
    created = obj.get("created")
    ident = obj.get("id")
    model = obj.get("model")
    role = delta.get("role")
    content = delta.get("content")
    reasoning = delta.get("reasoning_content")
    calls = delta.get("tool_calls")
    # Positional and inline on purpose: this runs once per upstream chunk.
    return Chunk(
        ident if type(ident) is str else str(ident or ""),
        created if type(created) is int else 0,
        model if type(model) is str else str(model or ""),
        role if type(role) is str else None,
        content if type(content) is str else None,
        reasoning if type(reasoning) is str else None,
        _tool_calls(calls) if calls else (),
        finish,
        usage if type(usage) is dict else None,
        choice is not None,
        obj,
        logprobs,
    )
