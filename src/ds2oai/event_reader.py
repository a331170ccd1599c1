"""Upstream body bytes -> normalized events, in order: the front half of `reframe`.

`EventReader.read(bytes)` feeds the SSE decoder and turns what it completes into
`UpstreamEvent`s for a dialect or collector. Comments are noted on the trace (queue wait) and
dropped; payloads that are not JSON objects are counted, logged and skipped; upstream error
messages are cleaned of control characters and secrets. With templates on, consecutive
payloads that fit the stream's text template (`chunk_template`) become one `TextDelta`
without JSON parsing, those that fit its reasoning template one `ReasoningDelta`, and those
that fit its tool-call arguments template one `ArgumentsDelta`; everything else is parsed in
full. A template is learned only from a parsed chunk of its kind, so a dialect always sees a
full `Chunk` before the first delta event of that kind.
Touches only the exchange's trace; no I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ds2oai.chain import Exchange
from ds2oai.chunk_template import TextTemplate
from ds2oai.events import (
    ArgumentsDelta,
    Chunk,
    MalformedChunk,
    ReasoningDelta,
    TextDelta,
    UpstreamErrorEvent,
    UpstreamEvent,
    parse_upstream_event,
)
from ds2oai.metrics import QUEUE_WAIT, observe
from ds2oai.sse import SSEComment, SSEDecoder, SSEEvent
from ds2oai.upstream_errors import sanitize_code, sanitize_message

__all__ = ["EventReader", "record_usage"]

log = logging.getLogger("ds2oai.reframe")

_LEARN_ATTEMPTS = 4  # templates tried per stream and kind before giving up on the byte path


class EventReader:
    __slots__ = (
        "_arguments",
        "_decoder",
        "_exchange",
        "_learn",
        "_learn_arguments",
        "_learn_reasoning",
        "_reasoning",
        "_secrets",
        "_template",
        "arguments_index",
        "chunks",
    )

    def __init__(self, exchange: Exchange, secrets: tuple[str, ...], *, templates: bool) -> None:
        self._exchange = exchange
        self._secrets = secrets
        self._decoder = SSEDecoder()
        self._template: TextTemplate | None = None
        self._reasoning: TextTemplate | None = None
        self._learn = _LEARN_ATTEMPTS if templates else 0
        self._learn_reasoning = _LEARN_ATTEMPTS if templates else 0
        self._arguments: TextTemplate | None = None
        self.arguments_index = 0  # the tool call the arguments template stands for
        self._learn_arguments = _LEARN_ATTEMPTS if templates else 0
        # Upstream events with a payload so far: about one token each (DeepSeek streams token
        # by token), the estimate per-key token limits charge when no usage came.
        self.chunks = 0

    def restart(self) -> None:
        """A new upstream body (a resumed stream) starts with a clean decoder."""
        self._decoder = SSEDecoder()

    def text_literal(self, data: bytes) -> bytes | None:
        """The text of `data` when it is one whole plain text chunk that fits the learned
        template, nothing pending before it: what `read(data)` would return as a one-literal
        `TextDelta`, found without decoding events. None otherwise (then `read()` it)."""
        template = self._template
        if template is None or not self._decoder.between_events(len(data)):
            return None
        literal = template.event_literal(data)
        if literal is not None:
            self.chunks += 1
        return literal

    def reasoning_literal(self, data: bytes) -> bytes | None:
        """`text_literal` for one whole plain reasoning chunk (the reasoning template's): what
        `read(data)` would return as a one-literal `ReasoningDelta`. None otherwise."""
        return self._event_literal(self._reasoning, data)

    def arguments_literal(self, data: bytes) -> bytes | None:
        """`text_literal` for one whole tool-call arguments chunk (the arguments template's,
        for the call `arguments_index`): what `read(data)` would return as a one-literal
        `ArgumentsDelta`. None otherwise."""
        return self._event_literal(self._arguments, data)

    def _event_literal(self, template: TextTemplate | None, data: bytes) -> bytes | None:
        # `text_literal` has these lines inline: it runs on every paced read.
        if template is None or not self._decoder.between_events(len(data)):
            return None
        literal = template.event_literal(data)
        if literal is not None:
            self.chunks += 1
        return literal

    def read(self, data: bytes) -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        # Consecutive payloads that fit one template (text, or a reasoning model's thinking),
        # not yet turned into events: their literals are checked together.
        template: TextTemplate | None = None
        kind: type[TextDelta | ReasoningDelta] = TextDelta
        run: list[bytes] = []
        payloads = 0
        for item in self._decoder.feed_raw(data):
            if type(item) is bytes:
                payloads += 1
                if (
                    template is not None
                    and item.startswith(template.prefix)
                    and item.endswith(template.suffix)
                ):
                    run.append(item)
                    continue
                if run:
                    self._run(run, template, kind, events)
                    run = []
                template, kind = self._run_template(item)
                if template is not None:
                    run.append(item)
                else:
                    self._payload(item, events)
            elif isinstance(item, SSEComment):
                trace = self._exchange.trace
                if trace.first_comment_at is None:
                    trace.first_comment_at = time.monotonic()
            else:
                assert isinstance(item, SSEEvent)
                payloads += 1
                if run:
                    self._run(run, template, kind, events)
                    run = []
                    template = None
                self._parsed(item.data, None, events)
        if run:
            self._run(run, template, kind, events)
        self.chunks += payloads
        return events

    def _run_template(
        self, payload: bytes
    ) -> tuple[TextTemplate | None, type[TextDelta | ReasoningDelta]]:
        """The template (and its event kind) whose prefix and suffix `payload` has, if any."""
        kinds: tuple[tuple[TextTemplate | None, type[TextDelta | ReasoningDelta]], ...] = (
            (self._template, TextDelta),
            (self._reasoning, ReasoningDelta),
        )
        for template, kind in kinds:
            if (
                template is not None
                and payload.startswith(template.prefix)
                and payload.endswith(template.suffix)
            ):
                return template, kind
        return None, TextDelta

    def _run(
        self,
        run: list[bytes],
        template: TextTemplate | None,
        kind: type[TextDelta | ReasoningDelta],
        events: list[UpstreamEvent],
    ) -> None:
        # `template` is the one the run's payloads were found to start and end with: only its
        # lengths cut them right (a fallback below may learn another one meanwhile).
        assert template is not None
        literals = template.literals(run)
        if literals is not None:
            self._delta(kind, literals, events)
            return
        for payload in run:  # some text is not a valid literal: take them one by one
            self._payload(payload, events)

    def _payload(self, payload: bytes, events: list[UpstreamEvent]) -> None:
        template = self._template
        literal = template.match(payload) if template is not None else None
        if literal is not None:
            self._delta(TextDelta, [literal], events)
            return
        template = self._reasoning
        literal = template.match(payload) if template is not None else None
        if literal is not None:
            self._delta(ReasoningDelta, [literal], events)
            return
        template = self._arguments
        literal = template.match(payload) if template is not None else None
        if literal is not None:
            last = events[-1] if events else None
            if type(last) is ArgumentsDelta and last.index == self.arguments_index:
                last.literals.append(literal)
            else:
                events.append(ArgumentsDelta(self.arguments_index, [literal]))
            return
        self._parsed(payload.decode("utf-8", "replace"), payload, events)

    @staticmethod
    def _delta(
        kind: type[TextDelta | ReasoningDelta], literals: list[bytes], events: list[UpstreamEvent]
    ) -> None:
        """Literals of one kind: onto the last event when it is that kind's delta, else anew."""
        last = events[-1] if events else None
        if type(last) is kind:
            last.literals.extend(literals)
        else:
            events.append(kind(literals))

    def _parsed(self, data: str, raw: bytes | None, events: list[UpstreamEvent]) -> None:
        try:
            event = parse_upstream_event(data)
        except MalformedChunk as exc:
            self._exchange.trace.malformed_chunks += 1
            log.warning(
                "skipped upstream chunk",
                extra={"request_id": self._exchange.request_id, "reason": str(exc)},
            )
            return
        if isinstance(event, Chunk):
            _note(self._exchange, event)
            if self._learn and raw is not None and TextTemplate.eligible(event):
                # A plain text chunk the template did not fit (or there is none yet).
                self._learn -= 1
                self._template = TextTemplate.learn(raw, event) or self._template
            elif (
                self._learn_reasoning and raw is not None and TextTemplate.eligible_reasoning(event)
            ):
                self._learn_reasoning -= 1
                learned = TextTemplate.learn(raw, event, reasoning=True)
                self._reasoning = learned or self._reasoning
            elif (
                self._learn_arguments and raw is not None and TextTemplate.eligible_arguments(event)
            ):
                self._learn_arguments -= 1
                learned = TextTemplate.learn_arguments(raw, event)
                if learned is not None:
                    self._arguments = learned
                    self.arguments_index = event.tool_calls[0].index
        elif isinstance(event, UpstreamErrorEvent):
            # The upstream's words go to the client: bounded, no control chars, no keys.
            event = UpstreamErrorEvent(
                sanitize_code(event.code, self._secrets) or "upstream_error",
                sanitize_message(event.message, self._secrets),
            )
        events.append(event)


def _note(exchange: Exchange, chunk: Chunk) -> None:
    trace = exchange.trace
    if trace.first_token_at is None and (chunk.content or chunk.reasoning or chunk.tool_calls):
        trace.first_token_at = time.monotonic()
        if trace.first_comment_at is not None:
            trace.queue_wait = trace.first_token_at - trace.first_comment_at
            observe(QUEUE_WAIT, trace.queue_wait)
    if chunk.usage is not None:
        record_usage(exchange, chunk.usage)


def record_usage(exchange: Exchange, usage: Mapping[str, Any]) -> None:
    """The answer's token counts, as metrics and limits read them from the trace."""
    trace = exchange.trace
    trace.prompt_tokens = _token_count(usage.get("prompt_tokens"))
    trace.completion_tokens = _token_count(usage.get("completion_tokens"))


def _token_count(value: object) -> int | None:
    """The upstream's count if it is one: metrics and limits add these up, so a negative, a
    string or a float (all valid JSON) must not reach them."""
    return value if type(value) is int and value >= 0 else None
