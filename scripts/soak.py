"""`make soak`: a bounded run of mixed normal and faulty traffic through one gateway process.

    client workers -> ds2oai serve -> ChaosProxy (tests/chaos_proxy.py) -> mock upstream

Starts the bundled mock upstream (uvicorn) and `ds2oai serve` as child processes, and the chaos
proxy in this process between them (each upstream connection gets a random fault: reset, stall,
truncation at an SSE event boundary, random splits, slow drip, or none). Workers then send, for
`--seconds`: normal streams (both streaming dialects, and non-streaming requests),
deepseek-reasoner streams (thinking, then text; on the chat and Responses routes the thinking
is checked too), `/v1/responses` streams and non-streaming answers, parallel tool calls on the
chat and Responses routes,
streams the mock breaks itself (`test_mode` stream_error, error_event, malformed,
insufficient_system_resource, rate_limit, server_error, slow, keepalive), clients that go away
mid-stream, and bad inputs (invalid JSON, oversized bodies, wrong methods, deep nesting, unknown
modes, non-HTTP bytes, half requests). Every answer is classified:

* completed-exact: the whole expected text, once, in order, and a success end;
* typed error: a prefix of the expected text then exactly one terminal error event of a type
  that fits the scenario, or (before any byte) an HTTP error with a fitting status and type;
* lost: anything else (a cut without a terminal event, completed-but-short, an untyped or
  unexpected error, a 5xx `server_error`, no answer within the client timeout);
* duplicated: a token repeated or out of order, or more than one terminal event.

Prints one summary (streams, faults injected, bad inputs tried, completed-exact, typed errors,
lost, duplicated, peak RSS of the gateway) and exits 1 when anything was lost, duplicated or
mishandled, a connection leaked through the proxy, or the gateway died.

Usage: `.venv/bin/python scripts/soak.py [--seconds 60] [--concurrency 48] [--seed 1]`
"""

# ruff: noqa: S603  (argv built here from sys.executable and fixed module names)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mock_upstream.mock_deepseek_sse import (  # noqa: E402
    NORMAL_TOKENS,
    REASONING_TOKENS,
    TIME_CALL,
    WEATHER_CALL,
)
from tests.chaos_proxy import ChaosProxy, mixed_policy  # noqa: E402
from tests.sse_client import parse_events  # noqa: E402

BROKEN = "upstream_stream_broken"
CHAOS_HTTP = frozenset({(502, "upstream_connection_error"), (504, "upstream_connection_error")})


# ----------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One kind of request and what may legitimately come back.

    `tokens`: the upstream's text chunks (a stream must carry a prefix of them, and all of them
    when it completes); `thinking`: the same for its thinking chunks on the chat route (the spec
    route shows no thinking); `complete`: a success end is allowed; `stream_errors`: terminal error
    types allowed after the first byte (besides `upstream_stream_broken`, always allowed: the
    chaos proxy may cut any stream); `http`: (status, type) allowed before the first byte
    (besides the chaos proxy's 502/504)."""

    name: str
    weight: float
    body: dict[str, Any]
    tokens: tuple[str, ...] = NORMAL_TOKENS
    thinking: tuple[str, ...] = ()
    calls: tuple[tuple[str, str], ...] = ()  # (name, arguments) of the tool calls, in order
    complete: bool = True
    stream_errors: frozenset[str] = frozenset()
    http: frozenset[tuple[int, str]] = frozenset()
    route: str = "/v1/chat/completions"
    fault: bool = False  # the upstream itself misbehaves (a fault injected by the mock)
    abort: bool = False  # the client goes away after the first bytes


def _responses(test_mode: str = "normal", **extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "input": "soak",
        "stream": True,
        "store": False,
        "test_mode": test_mode,
        **extra,
    }


def _chat(test_mode: str = "normal", **extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "soak"}],
        "stream": True,
        "test_mode": test_mode,
        **extra,
    }


LONG = tuple(f"tok{i} " for i in range(40))
WEATHER = ((WEATHER_CALL[2], "".join(WEATHER_CALL[3])),)
BOTH_CALLS = (*WEATHER, (TIME_CALL[2], "".join(TIME_CALL[3])))
UPSTREAM_ERROR = frozenset({"upstream_error"})

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("normal", 10, _chat()),
    Scenario("long", 5, _chat("long", mock_tokens=len(LONG)), tokens=LONG),
    Scenario("slow", 2, _chat("slow", mock_delay=0.02)),
    Scenario("keepalive", 1, _chat("keepalive")),
    Scenario("include_usage", 1, _chat("include_usage")),
    Scenario("chat_normal", 4, _chat(), route="/openai/v1/chat/completions"),
    Scenario(
        "chat_long",
        2,
        _chat("long", mock_tokens=len(LONG)),
        tokens=LONG,
        route="/openai/v1/chat/completions",
    ),
    Scenario("reasoning", 2, _chat("reasoning", model="deepseek-reasoner")),
    Scenario(
        "chat_reasoning",
        2,
        _chat("reasoning", model="deepseek-reasoner"),
        thinking=REASONING_TOKENS,
        route="/openai/v1/chat/completions",
    ),
    Scenario("non_stream", 2, _chat(stream=False)),
    Scenario(
        "chat_tool_calls",
        1,
        _chat("parallel_tool_calls"),
        tokens=(),
        calls=BOTH_CALLS,
        route="/openai/v1/chat/completions",
    ),
    Scenario("responses", 2, _responses(), route="/v1/responses"),
    Scenario(
        "responses_tool_calls",
        1,
        _responses("parallel_tool_calls"),
        tokens=(),
        calls=BOTH_CALLS,
        route="/v1/responses",
    ),
    Scenario(
        "responses_long",
        1,
        _responses("long", mock_tokens=len(LONG)),
        tokens=LONG,
        route="/v1/responses",
    ),
    Scenario(
        "responses_reasoning",
        2,
        _responses("reasoning", model="deepseek-reasoner"),
        thinking=REASONING_TOKENS,
        route="/v1/responses",
    ),
    Scenario(
        "responses_non_stream",
        1,
        _responses("reasoning", model="deepseek-reasoner", stream=False),
        thinking=REASONING_TOKENS,
        route="/v1/responses",
    ),
    Scenario("malformed", 2, _chat("malformed"), fault=True),
    Scenario(
        "stream_error",
        3,
        _chat("stream_error"),
        tokens=NORMAL_TOKENS[:3],
        complete=False,
        fault=True,
    ),
    Scenario(
        "error_event",
        2,
        _chat("error_event"),
        tokens=NORMAL_TOKENS[:2],
        complete=False,
        stream_errors=UPSTREAM_ERROR,
        http=frozenset({(502, "upstream_error")}),
        fault=True,
    ),
    Scenario(
        "insufficient_system_resource",
        1,
        _chat("insufficient_system_resource"),
        tokens=NORMAL_TOKENS[:3],
        complete=False,
        stream_errors=UPSTREAM_ERROR,
        fault=True,
    ),
    Scenario(
        "chat_error_event",
        1,
        _chat("error_event"),
        tokens=NORMAL_TOKENS[:2],
        complete=False,
        stream_errors=UPSTREAM_ERROR,
        http=frozenset({(502, "upstream_error")}),
        route="/openai/v1/chat/completions",
        fault=True,
    ),
    Scenario(
        "rate_limit",
        1,
        _chat("rate_limit"),
        complete=False,
        http=frozenset({(429, "rate_limit_error")}),
        fault=True,
    ),
    Scenario(
        "server_error",
        1,
        _chat("server_error"),
        complete=False,
        http=frozenset({(502, "upstream_connection_error")}),
        fault=True,
    ),
    Scenario("client_abort", 2, _chat("slow", mock_delay=0.05), abort=True),
    Scenario(
        "unknown_test_mode",
        0.5,
        _chat("no_such_mode"),
        complete=False,
        http=frozenset({(400, "invalid_request_error")}),
    ),
)

# Bad inputs: (name, weight, raw request bytes or None for the special ones, expected statuses)
_NESTED = b"[" * 100_000
_BIG = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 * 1024 * 1024) + b'"}]}'


def _post(body: bytes, path: str = "/v1/chat/completions") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (path.encode(), len(body), body)
    )


BAD_INPUTS: tuple[tuple[str, float, bytes, frozenset[int]], ...] = (
    ("invalid_json", 2, _post(b'{"messages": [,]}'), frozenset({400})),
    ("not_an_object", 1, _post(b"[1, 2, 3]"), frozenset({400})),
    ("missing_messages", 1, _post(b'{"stream": true}'), frozenset({400})),
    ("deep_nesting", 1, _post(_NESTED), frozenset({400})),
    ("oversized_body", 0.1, _post(_BIG), frozenset({413})),
    (
        "wrong_method",
        1,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n\r\n",
        frozenset({405}),
    ),
    ("no_such_path", 0.5, _post(b"{}", "/v1/nothing"), frozenset({404})),
    ("non_http_bytes", 0.5, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 20, frozenset({400})),
    (
        "bad_chunked",
        0.5,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        frozenset({400}),
    ),
    ("half_request", 0.5, b"POST /v1/chat/comp", frozenset()),  # sent, then the client leaves
)


# ------------------------------------------------------------------------------------- results


@dataclass
class Stats:
    streams: Counter[str] = field(default_factory=Counter)  # by scenario
    outcomes: Counter[str] = field(default_factory=Counter)  # completed_exact, typed_error, ...
    typed: Counter[str] = field(default_factory=Counter)  # typed errors by type
    bad: Counter[str] = field(default_factory=Counter)  # bad inputs by name
    bad_mishandled: Counter[str] = field(default_factory=Counter)
    upstream_faults: int = 0
    examples: list[str] = field(default_factory=list)

    def problem(self, kind: str, scenario: str, detail: str) -> None:
        self.outcomes[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind} [{scenario}]: {detail[:300]}")


class Verdict(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _prefix(pieces: Sequence[str], tokens: Sequence[str]) -> None:
    if list(pieces) != list(tokens[: len(pieces)]):
        raise Verdict("duplicated", f"not a prefix of the expected tokens: {list(pieces)[:12]}")


def verify_spec(s: Scenario, body: bytes) -> str:
    try:
        events = parse_events(body)
    except (AssertionError, UnicodeDecodeError) as exc:
        raise Verdict("lost", f"unparsable stream ({exc}): {body[-200:]!r}") from None
    names = [e.event for e in events]
    terminal = [n for n in names if n in ("response.completed", "response.error")]
    if len(terminal) > 1:
        raise Verdict("duplicated", f"{len(terminal)} terminal events")
    pieces = [e.json()["delta"] for e in events if e.event == "response.output_text.delta"]
    _prefix(pieces, s.tokens)
    if not terminal or names[-1] != terminal[0]:
        raise Verdict("lost", f"no terminal event at the end: {names[-3:]}")
    last = events[-1].json()
    if terminal[0] == "response.completed":
        if not s.complete or pieces != list(s.tokens):
            raise Verdict("lost", f"completed but not the expected whole text: {pieces[-3:]}")
        return "completed"
    if last["type"] != BROKEN and last["type"] not in s.stream_errors:
        raise Verdict("lost", f"unexpected error event {last}")
    return str(last["type"])


def verify_chat(s: Scenario, body: bytes) -> str:
    try:
        events = parse_events(body)
        objs = [e.json() for e in events if e.data != "[DONE]"]
    except (AssertionError, UnicodeDecodeError, ValueError) as exc:
        raise Verdict("lost", f"unparsable stream ({exc}): {body[-200:]!r}") from None
    dones = [e for e in events if e.data == "[DONE]"]
    errors = [o["error"] for o in objs if "error" in o]
    if len(dones) > 1 or len(errors) > 1:
        raise Verdict("duplicated", f"{len(dones)} [DONE], {len(errors)} error chunks")
    if not dones or events[-1].data != "[DONE]":
        raise Verdict("lost", "no [DONE] at the end")
    chunks = [o for o in objs if "error" not in o and o.get("choices")]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:]]
    _prefix([p for p in pieces if p], s.tokens)
    thoughts = [c["choices"][0]["delta"].get("reasoning_content") for c in chunks]
    thoughts = [t for t in thoughts if t]
    _prefix(thoughts, s.thinking)
    calls = _chat_calls(chunks, s)
    if errors:
        if errors[0]["type"] != BROKEN and errors[0]["type"] not in s.stream_errors:
            raise Verdict("lost", f"unexpected error chunk {errors[0]}")
        return str(errors[0]["type"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    if not s.complete or not finish or [p for p in pieces if p] != list(s.tokens):
        raise Verdict("lost", f"ended as a success without the whole text: finish={finish}")
    if thoughts != list(s.thinking):
        raise Verdict("lost", f"ended as a success without the whole thinking: {thoughts[-3:]}")
    if calls != [call for _name, call in s.calls]:
        raise Verdict("lost", f"ended as a success without the whole tool calls: {calls}")
    return "completed"


def verify_responses(s: Scenario, body: bytes) -> str:
    """A Responses stream: numbered events, one terminal event last, deltas that are prefixes
    of the expected text and thinking, and on success the whole of both, in the final output
    too."""
    try:
        events = parse_events(body)
        objs = [e.json() for e in events]
    except (AssertionError, UnicodeDecodeError, ValueError) as exc:
        raise Verdict("lost", f"unparsable stream ({exc}): {body[-200:]!r}") from None
    if [o["sequence_number"] for o in objs] != list(range(len(objs))):
        raise Verdict("duplicated", "sequence numbers not 0, 1, 2, ...")
    ends = ("response.completed", "response.incomplete", "response.failed")
    terminal = [o["type"] for o in objs if o["type"] in ends]
    if len(terminal) > 1:
        raise Verdict("duplicated", f"{len(terminal)} terminal events")
    if not terminal or objs[-1]["type"] != terminal[0]:
        raise Verdict("lost", f"no terminal event at the end: {[o['type'] for o in objs[-3:]]}")
    pieces = [o["delta"] for o in objs if o["type"] == "response.output_text.delta"]
    thoughts = [o["delta"] for o in objs if o["type"] == "response.reasoning_text.delta"]
    _prefix(pieces, s.tokens)
    _prefix(thoughts, s.thinking)
    fragments: dict[str, str] = {}
    for o in objs:
        if o["type"] == "response.function_call_arguments.delta":
            fragments[o["item_id"]] = fragments.get(o["item_id"], "") + o["delta"]
    expected = [arguments for _name, arguments in s.calls]
    parts = list(fragments.values())
    if len(parts) > len(expected) or any(
        not whole.startswith(part)
        for part, whole in zip(parts, expected[: len(parts)], strict=True)
    ):
        raise Verdict("duplicated", f"tool call arguments {list(fragments.values())}")
    if terminal[0] == "response.completed":
        if not s.complete or pieces != list(s.tokens) or thoughts != list(s.thinking):
            raise Verdict("lost", f"completed without the whole text: {pieces[-3:]}")
        _whole_output(objs[-1]["response"], s)
        return "completed"
    error = objs[-1]["response"].get("error") or {}
    if terminal[0] != "response.failed" or error.get("code") != "server_error":
        raise Verdict("lost", f"unexpected end {terminal[0]} {error}")
    return "response_failed"


def _whole_output(response: dict[str, Any], s: Scenario) -> None:
    output = response["output"]
    texts = {i["type"]: i["content"][0]["text"] for i in output if i["type"] != "function_call"}
    expected = {"message": "".join(s.tokens)} if s.tokens else {}
    if s.thinking:
        expected["reasoning"] = "".join(s.thinking)
    if texts != expected:
        raise Verdict("lost", f"final output {str(texts)[:120]}")
    calls = [(i["name"], i["arguments"]) for i in output if i["type"] == "function_call"]
    if calls != list(s.calls):
        raise Verdict("lost", f"final tool calls {calls}")


def _chat_calls(chunks: list[dict[str, Any]], s: Scenario) -> list[str]:
    """Each tool call's arguments, by index, after checking they are prefixes of the expected
    ones and carry the expected names."""
    arguments: dict[int, str] = {}
    for c in chunks:
        for call in c["choices"][0]["delta"].get("tool_calls") or ():
            index = call["index"]
            function = call.get("function") or {}
            name = function.get("name")
            if name is not None and (index >= len(s.calls) or name != s.calls[index][0]):
                raise Verdict("lost", f"tool call {index} named {name!r}")
            arguments[index] = arguments.get(index, "") + function.get("arguments", "")
    for index, text in arguments.items():
        if index >= len(s.calls) or not s.calls[index][1].startswith(text):
            raise Verdict("duplicated", f"tool call {index} arguments {text!r}")
    return [arguments[i] for i in sorted(arguments)]


def verify_json(s: Scenario, body: bytes) -> str:
    obj = json.loads(body)
    if s.route == "/v1/responses":
        if obj["status"] != "completed":
            raise Verdict("lost", f"non-streaming response {obj['status']}")
        _whole_output(obj, s)
        return "completed"
    content = obj["choices"][0]["message"]["content"]
    if content != "".join(s.tokens):
        kind = "duplicated" if len(content) > len("".join(s.tokens)) else "lost"
        raise Verdict(kind, f"non-streaming content {content[:80]!r}")
    return "completed"


def verify_http_error(s: Scenario, status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise Verdict(
            "lost", f"HTTP {status} without an OpenAI-style error: {body[:200]!r}"
        ) from None
    key = (status, error.get("type"))
    if key not in s.http and key not in CHAOS_HTTP:
        raise Verdict("lost", f"unexpected HTTP {status} {error}")
    return f"http_{status}_{error.get('type')}"


# ---------------------------------------------------------------------------------- the driver


async def run_scenario(
    session: aiohttp.ClientSession, base: str, s: Scenario, stats: Stats
) -> None:
    stats.streams[s.name] += 1
    if s.fault:
        stats.upstream_faults += 1
    try:
        async with session.post(base + s.route, json=s.body) as resp:
            if s.abort:
                await resp.content.readany()
                resp.close()
                stats.outcomes["client_aborted"] += 1
                return
            body = await resp.read()
            if resp.status != 200:
                verdict = verify_http_error(s, resp.status, body)
            elif resp.content_type == "application/json":
                verdict = verify_json(s, body)
            elif s.route.startswith("/openai"):
                verdict = verify_chat(s, body)
            elif s.route == "/v1/responses":
                verdict = verify_responses(s, body)
            else:
                verdict = verify_spec(s, body)
    except Verdict as exc:
        stats.problem(exc.kind, s.name, str(exc))
        return
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        stats.problem("lost", s.name, f"malformed answer ({type(exc).__name__}: {exc})")
        return
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.problem("lost", s.name, f"client error {type(exc).__name__}: {exc}")
        return
    if verdict == "completed":
        stats.outcomes["completed_exact"] += 1
    else:
        stats.outcomes["typed_error"] += 1
        stats.typed[verdict] += 1


async def run_bad_input(
    host: str, port: int, name: str, data: bytes, expected: frozenset[int], stats: Stats
) -> None:
    stats.bad[name] += 1
    status: int | None = None
    buf = b""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        stats.bad_mishandled[name] += 1
        stats.problem("bad_input_mishandled", name, f"connect failed: {exc}")
        return
    try:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            pass  # the gateway answered and closed before taking it all: fine
        if not expected:  # half a request, then the client leaves
            await asyncio.sleep(0.05)
            return
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                buf += chunk
                if b"\r\n\r\n" in buf and _whole(buf):
                    break
    except TimeoutError:
        pass
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()
    if buf.startswith(b"HTTP/1."):
        status = int(buf.split(b" ", 2)[1])
    if status not in expected:
        stats.bad_mishandled[name] += 1
        stats.problem("bad_input_mishandled", name, f"status {status}: {buf[:200]!r}")


def _whole(buf: bytes) -> bool:
    head, _, body = buf.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


async def drive(base: str, seconds: float, concurrency: int, seed: int, stats: Stats) -> None:
    host, port = base.removeprefix("http://").split(":")
    deadline = time.monotonic() + seconds
    weights = [s.weight for s in SCENARIOS]
    bad_weights = [b[1] for b in BAD_INPUTS]
    bad_share = 0.08
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30, sock_read=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline:
                if rng.random() < bad_share:
                    name, _, data, expected = rng.choices(BAD_INPUTS, weights=bad_weights)[0]
                    await run_bad_input(host, int(port), name, data, expected, stats)
                else:
                    scenario = rng.choices(SCENARIOS, weights=weights)[0]
                    await run_scenario(session, base, scenario, stats)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


# ------------------------------------------------------------------------------- the processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0):  # noqa: S310 - loopback URL we built
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _start_mock(port: int) -> subprocess.Popen[bytes]:
    argv = ["-m", "uvicorn", "mock_deepseek_sse:app", "--app-dir", str(ROOT / "mock_upstream")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "critical"]
    return subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )


def _start_gateway(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ds2oai", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def _sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _status_kib(pid, "VmRSS"))
        try:
            async with asyncio.timeout(0.25):
                await stop.wait()
        except TimeoutError:
            pass


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ds2oai-soak-"))
    mock: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    stats = Stats()
    mock_port, gw_port = _free_port(), _free_port()
    mock = _start_mock(mock_port)
    policy = mixed_policy(
        args.seed,
        weights=(
            ("pass", 6),
            ("split", 2),
            ("reset", 1),
            ("stall", 0.5),
            ("truncate", 1.5),
            ("drip", 0.2),
        ),
        max_bytes=20_000,
        max_events=30,
        drip_sizes=(8, 32),
    )
    gateway_exit: int | None = None
    leaked = -1
    try:
        await asyncio.to_thread(_wait_http, f"http://127.0.0.1:{mock_port}/", mock)
        async with ChaosProxy(mock_port, policy=policy) as proxy:
            config = workdir / "gateway.toml"
            config.write_text(
                f'[upstream]\nbase_url = "{proxy.url}"\nread_timeout = 1.0\nconnect_timeout = 2.0\n'
                "[retry]\nbase_delay = 0.01\nmax_delay = 0.1\ndeadline = 10.0\n"
                '[store]\nbackend = "memory"\n'
                "[logging]\naccess_log = false\n"
            )
            env = {**os.environ, "DS2OAI_CONFIG": str(config), "UPSTREAM_BASE_URL": proxy.url}
            env.pop("DEEPSEEK_API_KEY", None)
            gateway = _start_gateway(gw_port, env, workdir / "gateway.log")
            base = f"http://127.0.0.1:{gw_port}"
            await asyncio.to_thread(_wait_http, base + "/healthz", gateway)
            rss_start = _status_kib(gateway.pid, "VmRSS")
            peak = [rss_start]
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_rss(gateway.pid, peak, stop))
            started = time.monotonic()
            await drive(base, args.seconds, args.concurrency, args.seed, stats)
            elapsed = time.monotonic() - started
            alive = gateway.poll() is None
            if alive:
                try:
                    await asyncio.to_thread(_wait_http, base + "/healthz", gateway, 5.0)
                except RuntimeError:
                    alive = False
            hwm = _status_kib(gateway.pid, "VmHWM")
            stop.set()
            await sampler
            gateway_exit = await asyncio.to_thread(_stop, gateway)
            with contextlib.suppress(TimeoutError):
                await proxy.wait_idle(10)
            leaked = proxy.open_connections
            injected = dict(proxy.injected)
            chaos_faults = proxy.faults_injected
            upstream_conns = proxy.upstream_total
    finally:
        _stop(gateway)
        _stop(mock)

    o = stats.outcomes
    streams = sum(stats.streams.values())
    bad_total = sum(stats.bad.values())
    mishandled = sum(stats.bad_mishandled.values())
    lost, duplicated = o["lost"], o["duplicated"]
    chaos_detail = ", ".join(f"{k} {v}" for k, v in sorted(injected.items()))
    typed_detail = ", ".join(f"{k} {v}" for k, v in stats.typed.most_common())
    lines = [
        f"ds2oai soak: {elapsed:.0f} s, {args.concurrency} concurrent clients, seed {args.seed}",
        f"streams             {streams:>7}  ({streams / elapsed:.0f}/s; "
        f"{len(stats.streams)} scenarios, {o['client_aborted']} clients went away mid-stream)",
        f"faults injected     {chaos_faults + stats.upstream_faults:>7}  "
        f"(chaos proxy {chaos_faults} on {upstream_conns} upstream connections: {chaos_detail}; "
        f"faulty upstream modes {stats.upstream_faults})",
        f"bad inputs tried    {bad_total:>7}  ({bad_total - mishandled} rejected with the "
        f"expected 4xx or cut, {mishandled} mishandled)",
        f"completed-exact     {o['completed_exact']:>7}",
        f"typed errors        {o['typed_error']:>7}  ({typed_detail})",
        f"lost                {lost:>7}  (must be 0)",
        f"duplicated          {duplicated:>7}  (must be 0)",
        f"peak RSS            {max(peak[0], hwm) / 1024:>7.1f} MiB  "
        f"(gateway; {rss_start / 1024:.1f} MiB at start)",
        f"leaked connections  {leaked:>7}  (open at the chaos proxy once the gateway stopped)",
        f"gateway             {'up' if alive else 'DIED'} until the end, exit code {gateway_exit}",
    ]
    ok = lost == 0 and duplicated == 0 and mishandled == 0 and leaked == 0 and alive
    print("\n".join(lines))
    for example in stats.examples:
        print("  " + example)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
        print("result: OK")
        return 0
    print(f"result: FAILED (gateway log kept: {workdir / 'gateway.log'})")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration (default 60)")
    parser.add_argument("--concurrency", type=int, default=48, help="client workers (default 48)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args()
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
