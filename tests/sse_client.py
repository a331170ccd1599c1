"""A deliberately naive SSE reader for the tests, independent of `ds2oai.sse`.

It splits the whole body on blank lines and reads `event:`/`data:` lines, as a simple client
would; checking the gateway's output with the gateway's own decoder would prove little.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = ["Event", "parse_events", "read_events"]


@dataclass(frozen=True)
class Event:
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def parse_events(body: bytes) -> list[Event]:
    text = body.decode("utf-8")
    assert "\r" not in text, "the gateway emits LF line ends only"
    assert text.endswith("\n\n") or not text, f"the stream must end with a blank line: {text!r}"
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name = None
        data_lines = []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data_lines.append(value)
            else:
                raise AssertionError(f"unexpected line {line!r}")
        if data_lines:
            events.append(Event(name, "\n".join(data_lines)))
    return events


async def read_events(response: aiohttp.ClientResponse) -> list[Event]:
    return parse_events(await response.read())


def spec_text(events: list[Event]) -> str:
    return "".join(e.json()["delta"] for e in events if e.event == "response.output_text.delta")
