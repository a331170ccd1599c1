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

__all__ = ["ENCODINGS", "BodyTooLarge", "InvalidEncoding", "inflate"]

ENCODINGS: Final = frozenset({"gzip", "deflate"})


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
    data does not decode to one whole stream (gzip: one or more whole members)."""
    if coding not in ENCODINGS:
        raise ValueError(f"not an encoding this inflates: {coding!r}")
    parts: list[bytes] = []
    size = 0
    rest = data
    try:
        while True:
            decompressor = _decompressor(coding, rest)
            out = decompressor.decompress(rest, limit + 1 - size)
            size += len(out)
            parts.append(out)
            if size > limit or decompressor.unconsumed_tail:
                raise BodyTooLarge
            if not decompressor.eof:
                raise InvalidEncoding("the body ends inside its compressed stream")
            rest = decompressor.unused_data
            if not rest:
                return b"".join(parts)
            if coding != "gzip":  # only gzip has members that may follow each other
                raise InvalidEncoding("bytes follow the end of the compressed stream")
    except zlib.error as exc:
        raise InvalidEncoding(str(exc)) from None
