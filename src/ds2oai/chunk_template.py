"""Byte-level recognition of the common upstream chunk: "the same as before, new text".

Sits between the SSE decoder and the dialects, inside `reframe`; sans-IO, no state beyond the
learned bytes. Nearly every chunk of a DeepSeek answer repeats the previous one byte for byte
except for the text in `choices[0].delta.content`:

    {"id":"…","object":"chat.completion.chunk",…,"choices":[{"index":0,"delta":{"content":"Hi"},
    "logprobs":null,"finish_reason":null}],"usage":null}

`TextTemplate.learn()` takes one such chunk that was already parsed the normal way and keeps
the bytes before and after its text. `match()` then recognizes a later payload with the same
prefix and suffix and returns its text as the JSON string literal it is, validated, so the
dialects can splice it into their own pre-encoded bytes without parsing or re-encoding JSON.
Anything else (a finish_reason, usage, reasoning, tool calls, a changed id, odd spacing, an
invalid escape or invalid UTF-8 in the text) does not match and takes the normal path, so
the template changes speed, never meaning.
"""

from __future__ import annotations

import re

from ds2oai import jsonutil
from ds2oai.events import Chunk, parse_upstream_event

__all__ = ["TextTemplate"]

# One complete JSON string literal: no raw control characters, only the escapes JSON allows.
# `fullmatch` on the bytes between a fixed prefix and suffix proves the whole payload is the
# template's document with another text in it.
_LITERAL = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
_CONTENT_KEY = re.compile(rb'"content"\s*:\s*')
_PROBE = "\x01probe \u00e9"


class TextTemplate:
    __slots__ = ("_prefix", "_start", "_stop", "_suffix")

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        assert suffix, "a JSON object always ends after its last string"
        self._prefix = prefix
        self._suffix = suffix
        self._start = len(prefix)
        self._stop = -len(suffix)

    @staticmethod
    def eligible(chunk: Chunk) -> bool:
        """A plain text chunk, the only kind a template may stand for."""
        return bool(
            chunk.content
            and chunk.has_choice
            and chunk.finish_reason is None
            and chunk.usage is None
            and chunk.reasoning is None
            and not chunk.tool_calls
            and chunk.role in (None, "assistant")
        )

    @classmethod
    def learn(cls, payload: bytes, chunk: Chunk) -> TextTemplate | None:
        """A template from a plain text chunk (`payload` parsed as `chunk`), else None."""
        if not cls.eligible(chunk) or payload.count(b'"content"') != 1:
            return None
        key = _CONTENT_KEY.search(payload)
        if key is None:
            return None
        literal = _LITERAL.match(payload, key.end())
        if literal is None:
            return None
        template = cls(payload[: literal.start()], payload[literal.end() :])
        # Prove the text sits at choices[0].delta.content and nowhere else: the same bytes with
        # another text must parse to the same chunk with only that text changed.
        probe = parse_upstream_event(
            (template._prefix + jsonutil.dumps(_PROBE) + template._suffix).decode()
        )
        if not isinstance(probe, Chunk) or probe.content != _PROBE:
            return None
        probe.content = chunk.content
        if probe != chunk:  # `raw` is left out of the comparison
            return None
        return template

    def match(self, payload: bytes) -> bytes | None:
        """The text of `payload` as a JSON string literal when it fits the template."""
        if payload.startswith(self._prefix) and payload.endswith(self._suffix):
            # Were prefix and suffix to overlap, the slice is too short to be a literal.
            literal = payload[self._start : self._stop]
            if _LITERAL.fullmatch(literal) is not None:
                if literal.isascii():
                    return literal
                try:
                    literal.decode()
                except UnicodeDecodeError:
                    return None
                return literal
        return None
