"""JSON in one place: orjson for speed, compact output, and one decode error type.

`dumps` gives compact UTF-8 JSON on one line (SSE `data:` lines must not contain newlines);
`loads` takes bytes or str. Both are orjson's own functions, bound directly: they run several
times per streamed chunk, and a wrapper call would cost as much as the encoding.
"""

from __future__ import annotations

import orjson

__all__ = ["JSONDecodeError", "dumps", "loads"]

JSONDecodeError = orjson.JSONDecodeError
dumps = orjson.dumps
loads = orjson.loads
