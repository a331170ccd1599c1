"""Unit tests of the sans-IO SSE decoder and encoders (`ds2oai.sse`), WHATWG rules.

Every realistic stream is also decoded after a split at every byte offset and one byte at a
time: the decoder must not care where the transport cut the bytes.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds2oai import sse
from ds2oai.errors import SSEDecodeError
from ds2oai.sse import (
    SSEComment,
    SSEDecoder,
    SSEEvent,
    crlf_to_lf,
    encode_comment,
    encode_data,
    encode_event,
    space_data,
)

Item = SSEEvent | SSEComment


def decode(chunks: Sequence[bytes], *, max_event_bytes: int | None = None) -> list[Item]:
    decoder = (
        SSEDecoder() if max_event_bytes is None else SSEDecoder(max_event_bytes=max_event_bytes)
    )
    out: list[Item] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    out += decoder.flush()
    return out


def E(data: str, event: str = "message", id: str | None = None) -> SSEEvent:
    return SSEEvent(data, event, id)


# --------------------------------------------------------------------------- WHATWG table

WHATWG_CASES: list[tuple[str, bytes, list[Item]]] = [
    ("lf", b"data: a\n\n", [E("a")]),
    ("cr", b"data: a\r\r", [E("a")]),
    ("crlf", b"data: a\r\n\r\n", [E("a")]),
    ("mixed_line_ends_in_one_event", b"data: a\rdata: b\ndata: c\r\n\r\n", [E("a\nb\nc")]),
    ("mixed_event_terminators", b"data: 1\r\n\ndata: 2\n\rdata: 3\r\r\n", [E("1"), E("2"), E("3")]),
    ("lf_then_cr_is_two_line_ends", b"data: a\n\rdata: b\n\n", [E("a"), E("b")]),
    ("cr_cr_is_two_line_ends", b"data: a\r\rdata: b\r\r", [E("a"), E("b")]),
    ("comment_keep_alive", b": keep-alive\n\n", [SSEComment("keep-alive")]),
    ("empty_comment", b":\n", [SSEComment("")]),
    ("comment_inside_event", b"data: a\n: ping\ndata: b\n\n", [SSEComment("ping"), E("a\nb")]),
    ("data_colon_no_space", b"data:x\n\n", [E("x")]),
    ("data_colon_one_space_stripped", b"data: x\n\n", [E("x")]),
    ("data_colon_only_first_space_stripped", b"data:  x\n\n", [E(" x")]),
    ("data_trailing_space_kept", b"data: x \n\n", [E("x ")]),
    ("bare_data_line_is_empty_data", b"data\n\n", [E("")]),
    ("data_colon_empty_value", b"data:\n\n", [E("")]),
    ("two_bare_data_lines", b"data\ndata\n\n", [E("\n")]),
    ("value_may_contain_colons", b'data: {"a": "b:c"}\n\n', [E('{"a": "b:c"}')]),
    (
        "multiline_data_joined_with_lf",
        b"data: first\ndata: second\ndata: third\n\n",
        [E("first\nsecond\nthird")],
    ),
    ("multiple_events_in_one_feed", b"data: 1\n\ndata: 2\n\n", [E("1"), E("2")]),
    ("blank_lines_without_data_dispatch_nothing", b"\n\n\r\n\r\r", []),
    ("event_name", b"event: ping\ndata: x\n\n", [E("x", "ping")]),
    ("empty_event_name_is_message", b"event:\ndata: x\n\n", [E("x")]),
    ("event_name_reset_after_dispatch", b"event: a\ndata: 1\n\ndata: 2\n\n", [E("1", "a"), E("2")]),
    ("event_without_data_is_not_dispatched", b"event: ping\n\ndata: x\n\n", [E("x")]),
    ("last_event_name_wins", b"event: a\nevent: b\ndata: x\n\n", [E("x", "b")]),
    (
        "id_sticks_to_later_events",
        b"id: 7\ndata: a\n\ndata: b\n\n",
        [E("a", id="7"), E("b", id="7")],
    ),
    (
        "id_with_nul_is_ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [E("a", id="1"), E("b", id="1")],
    ),
    (
        "empty_id_resets_last_id",
        b"id: 1\ndata: a\n\nid\ndata: b\n\n",
        [E("a", id="1"), E("b", id="")],
    ),
    ("id_without_data_still_sets_last_id", b"id: 9\n\ndata: a\n\n", [E("a", id="9")]),
    ("unknown_fields_ignored", b"foo: bar\nretryx: 1\ndata: x\n\n", [E("x")]),
    ("field_names_are_case_sensitive", b"Data: x\nDATA: y\n\n", []),
    ("field_name_with_trailing_space_is_unknown", b"data : x\ndata \n\n", []),
    ("bom_stripped", b"\xef\xbb\xbfdata: x\n\n", [E("x")]),
    ("only_one_bom_stripped", b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n", [E("y")]),
    ("bom_after_start_is_not_stripped", b"data: x\n\n\xef\xbb\xbfdata: y\n\n", [E("x")]),
    ("eof_discards_unterminated_event", b"data: x\n", []),
    ("eof_discards_unterminated_line", b"data: x\n\ndata: y", [E("x")]),
    ("u2028_is_not_a_line_break", "data: a\u2028b\n\n".encode(), [E("a\u2028b")]),
    ("u2029_is_not_a_line_break", "data: a\u2029b\n\n".encode(), [E("a\u2029b")]),
    ("nel_is_not_a_line_break", "data: a\x85b\n\n".encode(), [E("a\x85b")]),
    ("vt_ff_are_not_line_breaks", b"data: a\x0bb\x0cc\n\n", [E("a\x0bb\x0cc")]),
    ("multibyte_utf8", "data: é€😀\n\n".encode(), [E("é€😀")]),
    ("invalid_utf8_replaced", b"data: \xff\xfeok\n\n", [E("\ufffd\ufffdok")]),
    ("invalid_utf8_in_event_name_replaced", b"event: \xffx\ndata: y\n\n", [E("y", "\ufffdx")]),
    ("truncated_utf8_replaced", b"data: \xe2\x82\n\n", [E("\ufffd")]),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [pytest.param(raw, expected, id=name) for name, raw, expected in WHATWG_CASES],
)
def test_decoder_follows_whatwg_rules(raw: bytes, expected: list[Item]) -> None:
    assert decode([raw]) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [pytest.param(raw, expected, id=name) for name, raw, expected in WHATWG_CASES],
)
def test_decoder_table_is_independent_of_one_byte_feeds(raw: bytes, expected: list[Item]) -> None:
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == expected


def test_decoder_joins_multiline_data_with_lf_whatever_the_line_ends() -> None:
    raw = b'data: {"a":\rdata: 1}\r\n\r\n'
    assert decode([raw]) == [E('{"a":\n1}')]


def test_decoder_returns_events_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [E("a")]
    assert decoder.feed(b"data: b\n\ndata: c") == [E("b")]
    assert decoder.feed(b"\n\n") == [E("c")]


def test_decoder_crlf_split_across_feeds_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The LF completes the CRLF of the data line; only the next CR is the blank line.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [E("a")]


def test_decoder_cr_at_end_of_feed_then_lf_blank_line_is_not_dispatched_twice() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [E("a")]
    assert decoder.feed(b"\ndata: b\n\n") == [E("b")]


def test_decoder_flush_discards_pending_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\ndata: partial\n") == []
    assert decoder.flush() == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 1500", 1500),
        (b"retry:0", 0),
        (b"retry: 15a", None),
        (b"retry: -1", None),
        (b"retry: 1.5", None),
        (b"retry:", None),
        (b"retry: ", None),
        (b"retry:  15", None),
        ("retry: \u0661\u0662".encode(), None),  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_decoder_retry_accepts_ascii_digits_only(line: bytes, expected: int | None) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(line + b"\n\n") == []  # a retry line alone dispatches nothing
    assert decoder.retry == expected


def test_decoder_invalid_retry_keeps_previous_value() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 3000\nretry: soon\n")
    assert decoder.retry == 3000


def test_decoder_huge_retry_value_never_raises_anything_but_sse_decode_error() -> None:
    decoder = SSEDecoder()
    with contextlib.suppress(SSEDecodeError):
        decoder.feed(b"retry: " + b"9" * 5000 + b"\ndata: x\n\n")


def test_decoder_bom_split_across_feeds_is_stripped_once() -> None:
    assert decode([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [E("x")]
    assert decode([b"\xef\xbb", b"\xbf", b"data: x\n\n"]) == [E("x")]
    # A second BOM is not stripped: it makes the first field name unknown.
    assert decode([b"\xef", b"\xbb\xbf\xef\xbb\xbfdata: x\n\n"]) == []
    assert decode([b"\xef\xbb\xbf", b"\xef\xbb\xbf", b"data: x\n\ndata: y\n\n"]) == [E("y")]


def test_decoder_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    # 0xEF 0xBB then "x": not a BOM, so the bytes are part of the first field name.
    assert decode([b"\xef\xbb", b"x\ndata: y\n\n"]) == [E("y")]
    assert decode([b"\xef", b"data: y\n\n"]) == []


def test_decoder_handles_a_one_mib_data_line() -> None:
    payload = "é" * (512 * 1024)  # 1 MiB of UTF-8
    raw = b"data: " + payload.encode() + b"\n\n"
    assert decode([raw]) == [E(payload)]
    step = 64 * 1024 + 1  # odd step: cuts through two-byte characters
    assert decode([raw[i : i + step] for i in range(0, len(raw), step)]) == [E(payload)]


class _CountingPattern:
    """Wraps the decoder's line-end regex and counts the bytes it is asked to scan."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self._pattern = pattern
        self.scanned = 0

    def finditer(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Iterator[Any]:
        self.scanned += min(len(string), endpos) - pos
        return self._pattern.finditer(string, pos, endpos)

    def search(self, string: Any, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        self.scanned += min(len(string), endpos) - pos
        return self._pattern.search(string, pos, endpos)


def test_decoder_scans_each_byte_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = _CountingPattern(sse._EOL)
    monkeypatch.setattr(sse, "_EOL", counter, raising=False)
    raw = b"data: " + b"a" * (64 * 1024) + b"\n\n"
    assert decode([raw[i : i + 64] for i in range(0, len(raw), 64)]) == [E("a" * 64 * 1024)]
    assert counter.scanned <= 4 * len(raw)


def test_decoder_rejects_a_data_line_over_max_event_bytes() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: " + b"a" * 100 + b"\n\n")


@pytest.mark.parametrize("method", ["feed", "feed_raw"])
@pytest.mark.parametrize("after", [b"", b"data: 1\n\n", b"data: 1\n\ndata: 2"])
def test_decoder_rejects_a_whole_event_over_max_event_bytes(method: str, after: bytes) -> None:
    # feed_raw takes runs of whole events in bulk; an oversized one among them still raises.
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(SSEDecodeError):
        getattr(decoder, method)(b"data: " + b"a" * 100 + b"\n\n" + after)


def test_decoder_rejects_an_unterminated_line_over_max_event_bytes_without_waiting() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    decoder.feed(b"data: " + b"a" * 40)
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"a" * 40)  # no line end yet: memory must still be bounded


def test_decoder_rejects_many_data_lines_adding_up_over_max_event_bytes() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    for _ in range(5):  # 5 x 11 bytes: still under the cap
        decoder.feed(b"data: 0123456789\n")
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: 0123456789\n")


def test_decoder_max_event_bytes_is_per_event() -> None:
    # Many small events together exceed the cap; each one alone is well under it.
    raw = b"data: 0123456789\n\n" * 20
    assert decode([raw], max_event_bytes=64) == [E("0123456789")] * 20


# --------------------------------------------------------------------------- realistic streams


def _ds_chunk(body: str) -> bytes:
    return b"data: " + body.encode() + b"\n\n"


_HEAD = '{"id":"c1","object":"chat.completion.chunk","created":1700000000,"model":"deepseek-chat",'
DEEPSEEK_STREAM = (
    b": keep-alive\n\n"
    + _ds_chunk(_HEAD + '"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    + b": keep-alive\n\n"
    + _ds_chunk(_HEAD + '"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}')
    + _ds_chunk(_HEAD + '"choices":[{"index":0,"delta":{"content":" world"}}]}')
    + _ds_chunk(_HEAD + '"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}')
    + _ds_chunk(_HEAD + '"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}')
    + b"data: [DONE]\n\n"
)

CRLF_STREAM = (
    b"retry: 1000\r\n"
    b'id: 1\r\nevent: chunk\r\ndata: {"a":1}\r\n\r\n'
    b": keep-alive\r\n\r\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b'id: 2\r\ndata: {"b":2}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

MULTIBYTE_STREAM = (
    b"\xef\xbb\xbf"
    + _ds_chunk(_HEAD + '"choices":[{"index":0,"delta":{"content":"é€😀"}}]}')
    + _ds_chunk(_HEAD + '"choices":[{"index":0,"delta":{"content":"a\u2028b😀é"}}]}')
    + "data: ☃\rdata: 日本語\r\r".encode()
)

# `data:` with no space, as some SSE servers write it, mixed with other spellings whose value
# must keep its own leading space.
UNSPACED_STREAM = (
    b'data:{"a":1}\n\n'
    b'data: {"b":2}\n\n'
    b'data:{"c":3}\ndata:[4]\n\n'
    b"data:  {two spaces}\n\n"
    b": data:{not a field}\n\n"
    b'xdata:{"ignored":1}\ndata:{"d":5}\n\n'
    b"data:plain\n\n"
    b"data:[DONE]\n\n"
)

REALISTIC = {
    "deepseek_keep_alive": DEEPSEEK_STREAM,
    "crlf": CRLF_STREAM,
    "multibyte_utf8": MULTIBYTE_STREAM,
    "unspaced": UNSPACED_STREAM,
    "unspaced_crlf": UNSPACED_STREAM.replace(b"\n", b"\r\n"),
}


def test_unspaced_stream_decodes_as_the_standard_says() -> None:
    assert decode([UNSPACED_STREAM]) == [
        E('{"a":1}'),
        E('{"b":2}'),
        E('{"c":3}\n[4]'),
        E(" {two spaces}"),
        SSEComment("data:{not a field}"),
        E('{"d":5}'),
        E("plain"),
        E("[DONE]"),
    ]


def test_an_unspaced_stream_takes_the_raw_fast_path() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_raw(b'data:{"a":1}\n\ndata:{"b":2}\n\n') == [b'{"a":1}', b'{"b":2}']
    assert decoder.feed_raw(b'data:{"c":3}\n\ndata:[DONE]\n\n') == [b'{"c":3}', b"[DONE]"]
    # Seen only on a line of its own (after a comment, say): from the next read on.
    decoder = SSEDecoder()
    assert decoder.feed_raw(b": hi\n\ndata:[1]\n\n") == [SSEComment("hi"), E("[1]")]
    assert decoder.feed_raw(b"data:[2]\n\n") == [b"[2]"]


@pytest.mark.parametrize(
    ("data", "line_start", "expected"),
    [
        (b'data:{"a":1}\n\n', True, b'data: {"a":1}\n\n'),
        (b'data:{"a":1}\n\n', False, b'data:{"a":1}\n\n'),  # the end of another line
        (b"x\ndata:[1]\ndata:plain\n", False, b"x\ndata: [1]\ndata:plain\n"),
        (b"data: {spaced}\n", True, b"data: {spaced}\n"),
        (b"data:", True, b"data:"),
    ],
)
def test_space_data_spaces_only_json_values_at_line_starts(
    data: bytes, line_start: bool, expected: bytes
) -> None:
    assert space_data(data, line_start=line_start) == expected


def test_deepseek_stream_decodes_to_its_chunks_and_keep_alives() -> None:
    items = decode([DEEPSEEK_STREAM])
    assert [type(i).__name__ for i in items] == ["SSEComment", "SSEEvent", "SSEComment"] + [
        "SSEEvent"
    ] * 5
    assert items[0] == SSEComment("keep-alive")
    events = [i for i in items if isinstance(i, SSEEvent)]
    assert '"content":"Hello"' in events[1].data
    assert events[-1] == E("[DONE]")


def test_crlf_stream_decodes_fields_ids_and_multiline_data() -> None:
    decoder = SSEDecoder()
    items = decoder.feed(CRLF_STREAM) + decoder.flush()
    assert items == [
        E('{"a":1}', "chunk", "1"),
        SSEComment("keep-alive"),
        E("line one\nline two", id="1"),
        E('{"b":2}', id="2"),
        E("[DONE]", id="2"),
    ]
    assert decoder.retry == 1000


def test_multibyte_stream_keeps_every_character() -> None:
    events = decode([MULTIBYTE_STREAM])
    assert len(events) == 3
    assert isinstance(events[0], SSEEvent)
    assert '"content":"é€😀"' in events[0].data
    assert isinstance(events[1], SSEEvent)
    assert "a\u2028b😀é" in events[1].data
    assert events[2] == E("☃\n日本語")


@pytest.mark.parametrize("raw", list(REALISTIC.values()), ids=list(REALISTIC))
def test_decoder_split_at_every_offset_matches_one_feed(raw: bytes) -> None:
    whole = decode([raw])
    assert whole, "the stream must decode to something"
    for offset in range(len(raw) + 1):
        assert decode([raw[:offset], raw[offset:]]) == whole, offset


@pytest.mark.parametrize("raw", list(REALISTIC.values()), ids=list(REALISTIC))
def test_decoder_one_byte_at_a_time_matches_one_feed(raw: bytes) -> None:
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == decode([raw])


@pytest.mark.parametrize("raw", list(REALISTIC.values()), ids=list(REALISTIC))
def test_decoder_ignores_empty_feeds_between_bytes(raw: bytes) -> None:
    chunks: list[bytes] = []
    for i in range(len(raw)):
        chunks += [raw[i : i + 1], b""]
    assert decode(chunks) == decode([raw])


def _as_events(items: Sequence[SSEEvent | SSEComment | bytes]) -> list[Any]:
    """feed_raw's bytes payloads as feed() reports them (event ids aside)."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, bytes):
            out.append(("message", item.decode("utf-8", "replace")))
        elif isinstance(item, SSEEvent):
            out.append((item.event, item.data))
        else:
            out.append(item)
    return out


_LINES = st.sampled_from(
    [
        b'data: {"a":1}\n\n',
        b"data: x\n\n",
        b"data:no-space\n\n",
        b": keep-alive\n\n",
        b"event: e\ndata: named\n\n",
        b"data: one\ndata: two\n\n",
        b"id: 7\ndata: with-id\n\n",
        b"data: cr\r\n\r\n",
        b"data: lone-cr\r\r",
        b"\n",
        b"data: \xc3\xa9\xff\n\n",
        b"retry: 5\n\n",
        b"data:\n\n",
        b"data: half\nignored-field\n\n",
        b"data: data: \n\n",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=12), st.lists(st.integers(0, 300), max_size=6))
def test_feed_raw_reports_the_same_events_as_feed(lines: list[bytes], cuts: list[int]) -> None:
    raw = b"".join(lines)
    positions = sorted({min(c, len(raw)) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *positions], [*positions, len(raw)], strict=True)]
    plain, fast = SSEDecoder(), SSEDecoder()
    expected: list[Any] = []
    got: list[Any] = []
    for piece in pieces:
        expected += _as_events(plain.feed(piece))
        got += _as_events(fast.feed_raw(piece))
    assert got == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"data: a\r\n\r\n", b"data: a\n\n"),
        (b"a\r\nb\n", b"a\nb\n"),
        (b"a\r\n\r", b"a\r\n\r"),  # a CR is left: the read stays as it is
        (b"a\rb\r\n", b"a\rb\r\n"),
        (b"a\r\r\n", b"a\r\r\n"),
        (b"plain\n", b"plain\n"),
    ],
)
def test_crlf_to_lf_only_when_no_cr_is_left(data: bytes, expected: bytes) -> None:
    assert crlf_to_lf(data) == expected


def test_a_crlf_stream_takes_the_raw_fast_path() -> None:
    # CRLF line ends (sse-starlette's default) give the same undecoded payloads as LF ones.
    decoder = SSEDecoder()
    assert decoder.feed_raw(b"data: {}\r\n\r\ndata: [1]\r\n\r\ndata: x") == [b"{}", b"[1]"]
    assert decoder.feed_raw(b"\r\n\r\n") == [b"x"]
    assert decoder.feed_raw(b"data: 2\r\n\r\n") == [b"2"]


# --------------------------------------------------------------------------- encoders


def test_encode_event_is_event_line_data_line_blank_line() -> None:
    assert encode_event("response.created", b'{"id":"x"}') == (
        b'event: response.created\ndata: {"id":"x"}\n\n'
    )


def test_encode_data_is_a_bare_data_event() -> None:
    assert encode_data(b"[DONE]") == b"data: [DONE]\n\n"


def test_encode_comment_defaults_to_keep_alive() -> None:
    assert encode_comment() == b": keep-alive\n\n"
    assert encode_comment("ping") == b": ping\n\n"


def test_encoded_frames_round_trip_through_the_decoder() -> None:
    raw = (
        encode_event("response.output_text.delta", '{"delta":"é"}'.encode())
        + encode_comment()
        + encode_data(b'{"x":1}')
    )
    assert decode([raw]) == [
        E('{"delta":"é"}', "response.output_text.delta"),
        SSEComment("keep-alive"),
        E('{"x":1}'),
    ]


# --------------------------------------------------------------------------- properties

_NO_EOL = st.characters(codec="utf-8", exclude_characters="\r\n")
_NO_EOL_NUL = st.characters(codec="utf-8", exclude_characters="\r\n\x00")
_EOLS = st.sampled_from([b"\n", b"\r", b"\r\n"])

_event_items = st.tuples(
    st.just("event"),
    st.one_of(st.none(), st.text(_NO_EOL, min_size=1, max_size=8)),
    st.one_of(st.none(), st.text(_NO_EOL_NUL, max_size=6)),
    st.lists(st.text(_NO_EOL, max_size=12), min_size=1, max_size=4),
)
_comment_items = st.tuples(
    st.just("comment"), st.text(_NO_EOL, max_size=10), st.none(), st.just([""])
)


@st.composite
def encoded_streams(draw: st.DrawFn) -> tuple[bytes, list[Item]]:
    """A valid SSE byte stream with random line ends, and the items it must decode to."""
    lines: list[bytes] = []
    expected: list[Item] = []
    last_id: str | None = None
    for kind, a, b, data_lines in draw(
        st.lists(st.one_of(_event_items, _comment_items), max_size=6)
    ):
        if kind == "comment":
            assert a is not None
            lines.append(b":" + a.encode())
            expected.append(SSEComment(a.lstrip(" ")))
            continue
        if a is not None:
            lines.append(b"event: " + a.encode())
        if b is not None:
            lines.append(b"id: " + b.encode())
            last_id = b
        lines.extend(b"data: " + line.encode() for line in data_lines)
        lines.append(b"")
        expected.append(SSEEvent("\n".join(data_lines), a or "message", last_id))
    out = bytearray(b"\xef\xbb\xbf" if draw(st.booleans()) else b"")
    previous = b""
    for line in lines:
        eol = draw(_EOLS)
        if previous == b"\r" and not line and eol == b"\n":
            eol = b"\r\n"  # CR + (empty line, LF) would be one CRLF, not two line ends
        out += line + eol
        previous = eol
    return bytes(out), expected


@settings(max_examples=200, deadline=None)
@given(stream=encoded_streams(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_property_any_chunking_decodes_to_the_same_events(
    stream: tuple[bytes, list[Item]], cuts: list[int]
) -> None:
    raw, expected = stream
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[i:j] for i, j in zip([0, *points], [*points, len(raw)], strict=True)]
    assert decode([raw]) == expected
    assert decode(chunks) == expected


_NOISY = st.one_of(
    st.binary(max_size=32),
    st.sampled_from(
        [b"data:", b"data: x", b"\r", b"\n", b"\r\n", b"retry: 12", b"id:\x00", b":", b"event: e"]
    ),
    st.just(b"\xef\xbb\xbf"),
)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(_NOISY, max_size=12), cap=st.sampled_from([16, 64, 1 << 20]))
def test_property_random_bytes_raise_nothing_but_sse_decode_error(
    chunks: list[bytes], cap: int
) -> None:
    decoder = SSEDecoder(max_event_bytes=cap)
    try:
        for chunk in chunks:
            for item in decoder.feed(chunk):
                assert isinstance(item, SSEEvent | SSEComment)
        decoder.flush()
    except SSEDecodeError:
        pass
