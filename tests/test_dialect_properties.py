"""Every dialect, any event sequence: exactly one terminal output, nothing after it."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ds2oai.dialects.chat import ChatDialect
from ds2oai.dialects.spec import SpecDialect
from ds2oai.events import (
    Chunk,
    Done,
    EndOfBody,
    StreamBroken,
    ToolCallDelta,
    UpstreamErrorEvent,
    UpstreamEvent,
)

chunks = st.builds(
    Chunk,
    id=st.just("up-1"),
    created=st.just(1),
    model=st.just("m"),
    role=st.sampled_from([None, "assistant"]),
    content=st.one_of(st.none(), st.text(max_size=5)),
    reasoning=st.one_of(st.none(), st.text(max_size=5)),
    tool_calls=st.lists(
        st.builds(ToolCallDelta, index=st.integers(0, 2), arguments=st.text(max_size=3)),
        max_size=2,
    ).map(tuple),
    finish_reason=st.sampled_from(
        [None, None, None, "stop", "length", "tool_calls", "insufficient_system_resource"]
    ),
    usage=st.one_of(st.none(), st.just({"prompt_tokens": 1, "completion_tokens": 2})),
    has_choice=st.booleans(),
)
endings = st.sampled_from(
    [Done(), EndOfBody(), StreamBroken("cut"), StreamBroken("slow", timeout=True)]
)
errors = st.builds(UpstreamErrorEvent, code=st.just("e"), message=st.just("m"))
sequences = st.lists(st.one_of(chunks, chunks, chunks, errors, endings), max_size=12).map(
    lambda events: [*events, EndOfBody()]  # a stream always ends somehow
)


def frames(data: bytes) -> list[str]:
    return [block for block in data.decode().split("\n\n") if block]


@settings(max_examples=300, deadline=None)
@given(sequences)
def test_chat_dialect_ends_exactly_once(events: list[UpstreamEvent]) -> None:
    dialect = ChatDialect("m", include_usage=True)
    out: list[str] = []
    for event in events:
        produced = frames(dialect.feed(event))
        if dialect.outcome is not None and produced:
            assert produced[-1] == "data: [DONE]"
        out += produced
    assert dialect.outcome is not None
    assert out[-1] == "data: [DONE]"
    assert out.count("data: [DONE]") == 1
    payloads = [json.loads(f.removeprefix("data: ")) for f in out[:-1]]
    errors = [p for p in payloads if "error" in p]
    assert len(errors) <= 1
    if errors:
        assert payloads[-1] is errors[0]
        assert dialect.outcome != "completed"
    assert all(f.startswith("data: ") and "\nevent:" not in f for f in out)


@settings(max_examples=300, deadline=None)
@given(sequences)
def test_spec_dialect_ends_exactly_once(events: list[UpstreamEvent]) -> None:
    dialect = SpecDialect("m")
    out: list[str] = []
    for event in events:
        before = dialect.outcome
        produced = frames(dialect.feed(event))
        if before is not None:
            assert produced == []
        out += produced
    names = [f.split("\n")[0].removeprefix("event: ") for f in out]
    terminal = [n for n in names if n in ("response.completed", "response.error")]
    assert len(terminal) == 1
    assert names[-1] == terminal[0]


def test_a_cut_answers_last_text_reaches_the_chat_client_before_the_error() -> None:
    dialect = ChatDialect("m")
    events: list[UpstreamEvent] = [
        Chunk("up-1", 1, "m", role="assistant", content="Hello", has_choice=True),
        Chunk(
            "up-1",
            1,
            "m",
            content="TAIL",
            finish_reason="insufficient_system_resource",
            has_choice=True,
        ),
        Done(),
    ]
    out = frames(b"".join(dialect.feed(e) for e in events))
    payloads = [json.loads(f.removeprefix("data: ")) for f in out[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p)
    assert text == "HelloTAIL"
    assert payloads[-1]["error"]["code"] == "insufficient_system_resource"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads if "choices" in p)
    assert out[-1] == "data: [DONE]"
    assert dialect.outcome == "upstream_error"
