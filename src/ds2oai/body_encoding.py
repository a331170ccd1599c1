"""Request bodies sent with `Content-Encoding: gzip` or `deflate`, inflated with a bound.

Sans-IO; called by the route handlers in server.py after the (compressed) body was read, before
it is parsed. aiohttp's own request decompression is off (`auto_decompress=False` in
`create_app`): it inflated what a read brought in before anything could look at the size, so a
few kilobytes of gzip made the process allocate hundreds of megabytes and hold its loop for
most of a second — before the client's key was even checked. Here no more than the body limit
(plus one byte, to tell that it was exceeded) is ever produced.
"""

from __future__ import annotations

import zlib
from typing import Final

__all__ = ["ENCODINGS", "MAX_MEMBERS", "BodyTooLarge", "InvalidEncoding", "inflate"]

ENCODINGS: Final = frozenset({"gzip", "deflate"})
MAX_MEMBERS: Final = 1024  # gzip members in one body (as aiohttp allows): real clients send one
_STEP: Final = 64 * 1024  # compressed bytes fed at a time


class BodyTooLarge(Exception):
    """The body inflates to more than the limit."""


class InvalidEncoding(Exception):
    """The body is not what its `Content-Encoding` says (corrupt, truncated, trailing bytes)."""


def _decompressor(coding: str, data: bytes) -> zlib._Decompress:
    if coding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # HTTP's "deflate" is the zlib format (RFC 9110 8.4.1.2), but many clients send raw deflate:
    # a zlib stream's first byte says method 8, as aiohttp checks too.
    if data and data[0] & 0x0F == 8:
        return zlib.decompressobj(zlib.MAX_WBITS)
    return zlib.decompressobj(-zlib.MAX_WBITS)


def inflate(data: bytes, coding: str, limit: int) -> bytes:
    """`data` decoded from `coding` (one of `ENCODINGS`), at most `limit` bytes of it.

    Raises `BodyTooLarge` as soon as the output would pass `limit`, `InvalidEncoding` when the
    data does not decode to one whole stream (gzip: up to `MAX_MEMBERS` whole members, which
    may be followed by zero padding)."""
    if coding not in ENCODINGS:
        raise ValueError(f"not an encoding this inflates: {coding!r}")
    view = memoryview(data)
    parts: list[bytes] = []
    size = 0
    offset = 0
    try:
        for _member in range(MAX_MEMBERS):
            decompressor = _decompressor(coding, data[offset : offset + 1])
            while not decompressor.eof:
                if offset >= len(data):
                    raise InvalidEncoding("the body ends inside its compressed stream")
                # Fed in steps: at a member's end zlib copies the input left over, so whole-
                # body feeds would cost the square of the body's size over many members.
                step = view[offset : offset + _STEP]
                out = decompressor.decompress(step, limit + 1 - size)
                size += len(out)
                parts.append(out)
                if size > limit:
                    raise BodyTooLarge
                offset += len(step) - len(decompressor.unused_data)
            if offset == len(data):
                return b"".join(parts)
            # Only gzip has members that may follow each other, or zero padding after them.
            if coding != "gzip" or data[offset] == 0:
                if coding == "gzip" and data.count(b"\0", offset) == len(data) - offset:
                    return b"".join(parts)
                raise InvalidEncoding("bytes follow the end of the compressed stream")
    except zlib.error as exc:
        raise InvalidEncoding(str(exc)) from None
    raise InvalidEncoding(f"more than {MAX_MEMBERS} gzip members")
