"""Mid-stream resume with DeepSeek chat prefix completion: the sans-IO bookkeeping.

`Progress` watches every chunk the dialect was fed (so every character the client has, or is
about to get) and, when the upstream breaks after text started and not inside a tool call,
builds the continuation request: the same body with one more message,
`{"role": "assistant", "content": <text so far>, "prefix": true}` (plus `reasoning_content` so
far in thinking mode), to be sent to the beta endpoint. Usage of every attempt is summed. The
reframe stage does the I/O. Off unless `[resume] enabled = true`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ds2oai.events import Chunk

__all__ = ["Progress", "ResumePolicy", "add_usage"]


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    max_attempts: int
    url: str  # the beta Chat Completions endpoint, from the config only


def add_usage(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Field-wise sum of two usage objects (nested objects summed too; other values from b)."""
    if a is None:
        return dict(b) if b is not None else None
    if b is None:
        return dict(a)
    total: dict[str, Any] = dict(a)
    for key, value in b.items():
        mine = total.get(key)
        if isinstance(value, bool) or isinstance(mine, bool):
            total[key] = value
        elif isinstance(value, int | float) and isinstance(mine, int | float):
            total[key] = mine + value
        elif isinstance(value, Mapping) and isinstance(mine, Mapping):
            total[key] = add_usage(mine, value)
        else:
            total[key] = value
    return total


class Progress:
    __slots__ = (
        "_carried",
        "_content",
        "_last_usage",
        "_reasoning",
        "attempts",
        "finished",
        "tools",
    )

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._carried: dict[str, Any] | None = None  # usage of earlier, broken attempts
        self._last_usage: dict[str, Any] | None = None
        self.tools = False
        self.finished = False
        self.attempts = 0

    def observe(self, chunk: Chunk) -> Chunk:
        """Record a chunk on its way to the dialect; returns it with usage summed so far."""
        if chunk.content:
            self._content.append(chunk.content)
        if chunk.reasoning:
            self._reasoning.append(chunk.reasoning)
        if chunk.tool_calls:
            self.tools = True
        if chunk.finish_reason is not None:
            self.finished = True
        if chunk.usage is None:
            return chunk
        self._last_usage = chunk.usage
        if self._carried is None:
            return chunk
        return replace(chunk, usage=add_usage(self._carried, chunk.usage))

    def resumable(self) -> bool:
        """Text started, no finish yet, and no tool call (a cut call cannot be continued)."""
        return bool(self._content or self._reasoning) and not self.tools and not self.finished

    def next_attempt(self, upstream_body: Mapping[str, Any]) -> dict[str, Any]:
        """The continuation request; carries this attempt's usage into the next."""
        self.attempts += 1
        self._carried = add_usage(self._carried, self._last_usage)
        self._last_usage = None
        prefix: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._content),
            "prefix": True,
        }
        if self._reasoning:
            prefix["reasoning_content"] = "".join(self._reasoning)
        messages = list(upstream_body.get("messages") or [])
        return {**upstream_body, "messages": [*messages, prefix], "stream": True}
