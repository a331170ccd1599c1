"""Byte-level recognition of the common upstream chunk: "the same as before, new text".

Sits between the SSE decoder and the dialects, inside `reframe`; sans-IO, no state beyond the
learned bytes. Nearly every chunk of a DeepSeek answer repeats the previous one byte for byte
except for the text in `choices[0].delta.content`:

    {"id":"…","object":"chat.completion.chunk",…,"choices":[{"index":0,"delta":{"content":"Hi"},
    "logprobs":null,"finish_reason":null}],"usage":null}

`TextTemplate.learn()` takes one such chunk that was already parsed the normal way and keeps the
bytes before and after its text. A reasoning model's thinking comes the same way, its text in
`delta.reasoning_content` with `content` null: `learn(..., reasoning=True)` keeps a template for
those chunks (a stream may have one of each kind). A tool call's arguments stream the same way
too, each fragment in `delta.tool_calls[0].function.arguments` of a chunk holding nothing else:
`learn_arguments()` keeps a template for one call's fragments. `match()` then recognizes a
later payload with the same prefix and suffix and returns its text as the JSON string literal
it is, validated, so the dialects can splice it into their own pre-encoded bytes without
parsing or re-encoding JSON. Anything else (a finish_reason, usage, another kind of text, a
tool call's id or name, a changed id, odd spacing, an invalid escape or invalid UTF-8 in the
text) does not match and takes the normal path, so the template changes speed, never meaning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ds2oai import jsonutil
from ds2oai.events import Chunk, choice_delta

__all__ = ["TextTemplate"]

# One complete JSON string literal: no raw control characters, only the escapes JSON allows.
# `fullmatch` on the bytes between a fixed prefix and suffix proves the whole payload is the
# template's document with another text in it. The quantifiers are possessive: with plain
# ones `re` keeps a backtracking entry per character (~100 bytes each, measured: 390 MB for a
# 4 MB run) and is 10x slower.
# A `\u` escape of a UTF-16 surrogate is valid only as a high one followed by a low one: a
# lone or reversed one is JSON orjson refuses, so the parsed path would skip that chunk.
_LITERAL = re.compile(
    rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]'
    rb"|\\u(?:(?![dD][89a-fA-F])[0-9a-fA-F]{4}"
    rb"|[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}))*+\""
)
# Many literals joined by LF, checked in one call: LF cannot occur inside a valid literal, so
# the separators fix where each one starts and ends.
_LITERALS = re.compile(_LITERAL.pattern + rb"(?:\n" + _LITERAL.pattern + rb")*+")
# The text's key, with the spacing `learn` accepts around its colon, by kind.
_KEYS = {
    "content": (b'"content"', re.compile(rb'"content"\s*:\s*')),
    "reasoning_content": (b'"reasoning_content"', re.compile(rb'"reasoning_content"\s*:\s*')),
    "arguments": (b'"arguments"', re.compile(rb'"arguments"\s*:\s*')),
}
_PROBE = "\x01probe \u00e9"
_OTHER_PROBE = "\x02probe \u00fc"  # for a chunk whose own text is `_PROBE`


class TextTemplate:
    __slots__ = (
        "_crlf_event_suffix",
        "_event_prefix",
        "_event_suffix",
        "_start",
        "_stop",
        "_unspaced_event_prefix",
        "prefix",
        "suffix",
    )

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        # Only `learn()` builds one, from a one-line payload: prefix and suffix hold no line end.
        assert suffix, "a JSON object always ends after its last string"
        # Read-only: a caller may test `startswith(prefix)` and `endswith(suffix)` itself in a
        # hot loop, then hand the payloads that pass to `literals()`.
        self.prefix = prefix
        self.suffix = suffix
        self._start = len(prefix)
        self._stop = -len(suffix)
        # The same payload as a whole SSE event: prefix, suffix and a valid literal hold no line
        # end, so what matches these is exactly one one-line event.
        self._event_prefix = b"data: " + prefix
        # `data:` with no space before the payload: the same event when the payload does not
        # start with a space itself (else the only prefix is the spaced one).
        self._unspaced_event_prefix = (
            b"data:" + prefix if prefix[:1] != b" " else self._event_prefix
        )
        self._event_suffix = suffix + b"\n\n"
        self._crlf_event_suffix = suffix + b"\r\n\r\n"

    @staticmethod
    def eligible(chunk: Chunk) -> bool:
        """A plain text chunk: answer text and nothing else."""
        return (
            bool(chunk.content)
            and chunk.reasoning is None
            and not chunk.tool_calls
            and _nothing_else(chunk)
        )

    @staticmethod
    def eligible_reasoning(chunk: Chunk) -> bool:
        """A plain reasoning chunk: thinking text and nothing else, `content` null."""
        return (
            bool(chunk.reasoning)
            and chunk.content is None
            and not chunk.tool_calls
            and _nothing_else(chunk)
        )

    @staticmethod
    def eligible_arguments(chunk: Chunk) -> bool:
        """A fragment of one tool call's arguments and nothing else: no id, name or text."""
        calls = chunk.tool_calls
        return (
            len(calls) == 1
            and bool(calls[0].arguments)
            and calls[0].id is None
            and calls[0].name is None
            and chunk.content is None
            and chunk.reasoning is None
            and _nothing_else(chunk)
        )

    @classmethod
    def learn(cls, payload: bytes, chunk: Chunk, *, reasoning: bool = False) -> TextTemplate | None:
        """A template from a plain text chunk (`payload` parsed as `chunk`), else None; with
        `reasoning`, from a plain reasoning chunk, standing for its `reasoning_content`."""
        if reasoning:
            if not cls.eligible_reasoning(chunk):
                return None
            return cls._learn(payload, chunk, "reasoning_content", chunk.reasoning, _delta)
        if not cls.eligible(chunk):
            return None
        return cls._learn(payload, chunk, "content", chunk.content, _delta)

    @classmethod
    def learn_arguments(cls, payload: bytes, chunk: Chunk) -> TextTemplate | None:
        """A template from a chunk holding only a fragment of one tool call's arguments,
        standing for that fragment (the call's index is part of the template's bytes)."""
        if not cls.eligible_arguments(chunk):
            return None
        return cls._learn(payload, chunk, "arguments", chunk.tool_calls[0].arguments, _function)

    @classmethod
    def _learn(
        cls,
        payload: bytes,
        chunk: Chunk,
        name: str,
        original: str | None,
        holder: Callable[[Any], Any],
    ) -> TextTemplate | None:
        quoted, key_pattern = _KEYS[name]
        # Once: a second key of that name (escaped or not) is what the probe below is for,
        # but two plain ones cannot be told apart here. `"content"` does not occur inside
        # `"reasoning_content"` (the quote), so the two kinds never count each other.
        if payload.count(quoted) != 1:
            return None
        if not _one_line(payload):  # not the one-line `data:` payload a template stands for
            return None
        key = key_pattern.search(payload)
        if key is None:
            return None
        literal = _LITERAL.match(payload, key.end())
        if literal is None:
            return None
        prefix, suffix = payload[: literal.start()], payload[literal.end() :]
        # Prove the text sits where `holder` says (choices[0].delta.content, say) and nowhere
        # else: the same bytes with another text must be the same JSON document with only that
        # text changed. The probe must differ from the chunk's own text, or finding it there
        # would prove nothing (the literal might sit under a key that a later duplicate
        # overrides).
        text = _PROBE if original != _PROBE else _OTHER_PROBE
        try:
            probe = jsonutil.loads(prefix + jsonutil.dumps(text) + suffix)
            # Where `parse_upstream_event` takes the text from, by the same function.
            where = holder(probe)
        except (jsonutil.JSONDecodeError, LookupError, TypeError, AttributeError):
            return None
        if type(where) is not dict or where.get(name) != text:
            return None
        where[name] = original
        if probe != chunk.raw:  # the whole document, fields no `Chunk` keeps included
            return None
        return cls(prefix, suffix)

    def match(self, payload: bytes) -> bytes | None:
        """The text of `payload` as a JSON string literal when it fits the template."""
        if payload.startswith(self.prefix) and payload.endswith(self.suffix):
            found = self.literals([payload])
            return found[0] if found is not None else None
        return None

    def event_literal(self, data: bytes) -> bytes | None:
        """The text of `data` as a valid JSON string literal when `data` is exactly one whole
        one-line event `data: <payload>\\n\\n` (or with CRLF line ends, or `data:` without the
        space) whose payload fits the template; else None."""
        if data.startswith(self._event_prefix):
            start = self._start + 6
        elif data.startswith(self._unspaced_event_prefix):
            start = self._start + 5
        else:
            return None
        if data.endswith(self._event_suffix):
            literal = data[start : self._stop - 2]
        elif data.endswith(self._crlf_event_suffix):
            literal = data[start : self._stop - 4]
        else:
            return None
        if _LITERAL.fullmatch(literal) is not None and _utf8(literal):
            return literal
        return None

    def literals(self, payloads: list[bytes]) -> list[bytes] | None:
        """The texts of payloads that all start with `prefix` and end with `suffix`, when every
        one is a valid literal (checked together); None when any is not. Were prefix and suffix
        to overlap in a payload, its slice is too short to be a literal."""
        start, stop = self._start, self._stop
        literals = [payload[start:stop] for payload in payloads]
        joined = b"\n".join(literals)
        if _LITERALS.fullmatch(joined) is not None and _utf8(joined):
            return literals
        return None


def _delta(document: Any) -> Any:
    """Where a chunk's text and thinking are (as `parse_upstream_event` finds them)."""
    return choice_delta(document["choices"][0])


def _function(document: Any) -> Any:
    """Where a chunk's first tool call's arguments are (as `_tool_calls` finds them)."""
    return choice_delta(document["choices"][0])["tool_calls"][0]["function"]


def _nothing_else(chunk: Chunk) -> bool:
    """What every kind a template stands for shares: a choice, and no finish, usage, logprobs
    or new role beside the one text (the callers check the delta's texts and tool calls)."""
    return (
        chunk.has_choice
        and chunk.finish_reason is None
        and chunk.usage is None
        and chunk.logprobs is None
        and chunk.role in (None, "assistant")
    )


def _one_line(data: bytes) -> bool:
    # Two memchr scans: a `[\r\n]` class search walks the bytes in Python's `re` (10x slower).
    return data.find(b"\n") < 0 and data.find(b"\r") < 0


def _utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
