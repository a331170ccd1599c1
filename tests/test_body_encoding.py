"""Request bodies with `Content-Encoding` (`body_encoding.inflate`, sans-IO): decoded whole, or
refused, never inflated past the limit."""

from __future__ import annotations

import gzip
import zlib

import pytest

from ds2oai.body_encoding import MAX_MEMBERS, BodyTooLarge, InvalidEncoding, inflate

BODY = b'{"messages": [{"role": "user", "content": "' + b"hello " * 200 + b'"}]}'


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("coding", "packed"),
    [
        ("gzip", gzip.compress(BODY)),
        ("gzip", gzip.compress(BODY[:100]) + gzip.compress(BODY[100:])),  # two members
        ("deflate", zlib.compress(BODY)),  # HTTP's deflate: the zlib format
        ("deflate", raw_deflate(BODY)),  # what many clients send instead
    ],
)
def test_whole_bodies_are_inflated(coding: str, packed: bytes) -> None:
    assert inflate(packed, coding, len(BODY)) == BODY


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_bomb_stops_at_the_limit(coding: str) -> None:
    zeros = 1 << 28  # 256 MiB of zeros pack into about a megabyte
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    packer = zlib.compressobj(1, wbits=wbits)
    block = bytes(1 << 20)
    packed = b"".join(packer.compress(block) for _ in range(zeros >> 20)) + packer.flush()
    assert len(packed) < 4 << 20  # under the limit as sent
    with pytest.raises(BodyTooLarge):
        inflate(packed, coding, 4 << 20)


def test_the_limit_itself_passes() -> None:
    assert inflate(gzip.compress(BODY), "gzip", len(BODY)) == BODY
    with pytest.raises(BodyTooLarge):
        inflate(gzip.compress(BODY), "gzip", len(BODY) - 1)


@pytest.mark.parametrize(
    ("coding", "packed"),
    [
        ("gzip", BODY),  # plain bytes labelled gzip
        ("gzip", gzip.compress(BODY)[:-9]),  # truncated
        ("gzip", gzip.compress(BODY) + b"trailing"),
        ("deflate", zlib.compress(BODY) + b"x"),
        ("deflate", zlib.compress(BODY)[:-3]),
        ("gzip", b""),
    ],
)
def test_what_is_not_one_whole_stream_is_invalid(coding: str, packed: bytes) -> None:
    with pytest.raises(InvalidEncoding):
        inflate(packed, coding, 1 << 20)


def test_only_gzip_and_deflate() -> None:
    with pytest.raises(ValueError, match="br"):
        inflate(b"", "br", 10)


def test_members_are_bounded_in_number_and_cost() -> None:
    empty = gzip.compress(b"")
    assert inflate(empty * MAX_MEMBERS, "gzip", 10) == b""
    # 200,000 empty members in 4 MB: refused after the first MAX_MEMBERS, each of whose ends
    # copies at most one feed step of leftover input (not the rest of the body).
    with pytest.raises(InvalidEncoding, match="members"):
        inflate(empty * 200_000, "gzip", 1 << 20)


def test_zero_padding_after_the_last_member_is_allowed() -> None:
    assert inflate(gzip.compress(BODY) + bytes(64), "gzip", len(BODY)) == BODY
