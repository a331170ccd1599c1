"""Fault injection under concurrency: client -> gateway -> ChaosProxy -> upstream (SPEC §4).

Every stream must end one of three ways, and nothing else:

* complete and exact: every upstream token once, in order, then `response.completed`
  (`finish_reason` and usage from the upstream) - never completed-but-short;
* a prefix of the tokens, then exactly one `response.error` of type `upstream_stream_broken`
  (closed/reset/truncated, or "timed out" after `read_timeout` of silence) - the last event;
* before any downstream byte: an HTTP 502/504 JSON error (`upstream_connection_error`, code
  `connect_failed` / `upstream_stream_broken` / `upstream_timeout`).

After each run nothing may be left behind: no open connection on either side of the chaos proxy
(the gateway closed every upstream connection it opened), none at the upstream, no asyncio task
beyond the baseline and the process's fd count back near its baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.chaos_proxy import (
    BoundaryTracker,
    ChaosProxy,
    Drip,
    Fault,
    Pass,
    Policy,
    RandomSplit,
    ResetAfter,
    StallAfter,
    TruncateAfterEvent,
    mixed_policy,
)
from tests.conftest import GatewayFactory
from tests.fault_upstream import FaultUpstream, sse_script, text_events
from tests.sse_client import parse_events

TOKENS = ["Hé", "llo", " wörld", " €", " 😀", "!", " ok"]
TEXT = "".join(TOKENS)
EVENTS = text_events(TOKENS)  # role chunk, 7 tokens, finish chunk (with usage), [DONE]
SCRIPT = sse_script(EVENTS)
READ_TIMEOUT = 1.0  # stalls are reported after this; generous enough for a loaded CI box
BROKEN_MESSAGE = "Upstream SSE connection closed unexpectedly"
HTTP_ERROR_CODES = {502: {"connect_failed", "upstream_stream_broken"}, 504: {"upstream_timeout"}}

# The upstream's response head as FaultUpstream writes it (the proxy's byte counts include it).
HEAD_BYTES = len(
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n"
)
FRAMED = [len(b"%x\r\n%s\r\n" % (len(e), e)) for e in EVENTS]
REPLY_BYTES = HEAD_BYTES + sum(FRAMED) + 5
FIRST_EVENT_END = HEAD_BYTES + FRAMED[0]  # the role chunk: `response.created` goes out


def payload(**extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        **extra,
    }


# ------------------------------------------------------------------------- per-stream verdicts


@dataclass
class Outcome:
    """What one client saw: the HTTP status and the raw body (or the client-side failure)."""

    status: int
    body: bytes
    content_type: str
    failure: str | None = None  # the body could not be read to its end (a cut, a hang)


@dataclass
class Tally:
    kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def check(self, outcome: Outcome | None, verify: Callable[[Outcome], str], index: int) -> None:
        if outcome is None:
            self.kinds["client_aborted"] += 1
            return
        try:
            self.kinds[verify(outcome)] += 1
        except (AssertionError, ValueError, KeyError, TypeError, IndexError) as exc:
            self.problems.append(f"stream {index}: {exc} -- {outcome.status} {outcome.body!r}")

    def assert_ok(self) -> None:
        shown = "\n".join(self.problems[:10])
        assert not self.problems, f"{len(self.problems)} bad streams ({dict(self.kinds)}):\n{shown}"


def _http_error(outcome: Outcome) -> str:
    assert outcome.content_type == "application/json", f"content type {outcome.content_type}"
    error = json.loads(outcome.body)["error"]
    assert error["type"] == "upstream_connection_error", error
    assert error["code"] in HTTP_ERROR_CODES.get(outcome.status, set()), error
    return f"http_{outcome.status}_{error['code']}"


def verify_spec(outcome: Outcome, tokens: Sequence[str] = TOKENS) -> str:
    """The verdict for one `/v1/chat/completions` stream; AssertionError when it is wrong."""
    assert outcome.failure is None, f"client saw {outcome.failure}"
    if outcome.status != 200:
        return _http_error(outcome)
    events = parse_events(outcome.body)
    names = [e.event for e in events]
    assert names, "no events"
    assert names[0] == "response.created", names
    terminal = [i for i, n in enumerate(names) if n in ("response.completed", "response.error")]
    assert terminal == [len(names) - 1], f"one terminal event, last: {names}"
    assert set(names[1:-1]) <= {"response.output_text.delta"}, names
    deltas = [e.json()["delta"] for e in events if e.event == "response.output_text.delta"]
    assert deltas == list(tokens[: len(deltas)]), f"not a prefix (dup/reorder): {deltas}"
    last = events[-1].json()
    if names[-1] == "response.completed":
        assert deltas == list(tokens), f"completed but short: {deltas}"
        assert last["finish_reason"] == "stop", last
        assert last["usage"]["completion_tokens"] == len(tokens), last
        return "completed"
    assert last["type"] == "upstream_stream_broken", last
    assert last["message"] == BROKEN_MESSAGE or "timed out" in last["message"], last
    return "broken_timeout" if "timed out" in last["message"] else "broken"


def verify_chat(outcome: Outcome, tokens: Sequence[str] = TOKENS) -> str:
    """The verdict for one `/openai/v1/chat/completions` stream (bare `data:` chunks)."""
    assert outcome.failure is None, f"client saw {outcome.failure}"
    if outcome.status != 200:
        return _http_error(outcome)
    events = parse_events(outcome.body)
    assert all(e.event is None for e in events)
    assert events, "no events"
    assert events[-1].data == "[DONE]", "ends with [DONE]"
    objs = [e.json() for e in events[:-1]]
    assert all(e.data != "[DONE]" for e in events[:-1]), "one [DONE]"
    errors = [i for i, o in enumerate(objs) if "error" in o]
    assert errors in ([], [len(objs) - 1]), f"the error chunk is the last one: {objs}"
    chunks = objs[:-1] if errors else objs
    assert chunks, "a first chunk (role) before anything else"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    pieces = [c for c in contents[1:] if c]  # the first delta is the role chunk
    assert pieces == list(tokens[: len(pieces)]), f"not a prefix (dup/reorder): {pieces}"
    if errors:
        error = objs[-1]["error"]
        assert error["type"] == "upstream_stream_broken", error
        assert all(f is None for f in finishes), "no finish_reason before an error"
        return "broken_timeout" if "timed out" in error["message"] else "broken"
    assert pieces == list(tokens), f"completed but short: {pieces}"
    assert finishes[-1] == "stop", finishes
    return "completed"


VERIFY: dict[str, Callable[[Outcome], str]] = {"spec": verify_spec, "chat": verify_chat}
ROUTE = {"spec": "/v1/chat/completions", "chat": "/openai/v1/chat/completions"}


# --------------------------------------------------------------------------------- the harness


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Baseline:
    """Tasks and fds before a run; `assert_clean()` waits for them to come back."""

    def __init__(self) -> None:
        self.tasks = set(asyncio.all_tasks())
        self.fds = fd_count()

    async def assert_clean(self, proxy: ChaosProxy, upstream: FaultUpstream) -> None:
        timeout = 5.0
        try:
            await proxy.wait_idle(timeout)
        except TimeoutError:
            raise AssertionError(
                f"connections leaked through the chaos proxy: {proxy.downstream_open} from the "
                f"gateway, {proxy.upstream_open} to the upstream still open"
            ) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        me = asyncio.current_task()
        while True:
            extra = {t for t in asyncio.all_tasks() if t not in self.tasks and t is not me}
            fds = fd_count()
            if not extra and upstream.connections_open == 0 and fds <= self.fds + 3:
                break
            if loop.time() > deadline:
                names = sorted({getattr(t.get_coro(), "__qualname__", repr(t)) for t in extra})
                raise AssertionError(
                    f"leaked: {len(extra)} tasks {names}, {upstream.connections_open} upstream "
                    f"connections, fds {self.fds} -> {fds}"
                )
            await asyncio.sleep(0.05)
        assert proxy.handler_errors == 0
        assert upstream.handler_errors == 0


async def run_streams(
    url: str,
    n: int,
    *,
    dialect: str = "spec",
    body: dict[str, Any] | None = None,
    abort_every: int = 0,
    total_timeout: float = 20.0,
) -> list[Outcome | None]:
    """`n` concurrent streams, each on its own connection (closed at the end of the response).

    With `abort_every` k, every k-th client goes away after its first bytes (its outcome is
    None): the gateway must then close that upstream connection (the leak check sees it)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=total_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> Outcome | None:
            try:
                async with session.post(url + ROUTE[dialect], json=body or payload()) as resp:
                    status, ctype = resp.status, resp.content_type
                    if abort_every and i % abort_every == abort_every - 1:
                        await resp.content.readany()
                        resp.close()
                        return None
                    try:
                        return Outcome(status, await resp.read(), ctype)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        return Outcome(status, b"", ctype, f"{type(exc).__name__}: {exc}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                return Outcome(0, b"", "", f"{type(exc).__name__}: {exc}")

        return await asyncio.gather(*(one(i) for i in range(n)))


async def chaos_run(
    gateway: GatewayFactory,
    policy: Policy,
    n: int,
    *,
    dialect: str = "spec",
    script: Any = SCRIPT,
    abort_every: int = 0,
) -> tuple[Tally, ChaosProxy]:
    async with FaultUpstream(script) as upstream, ChaosProxy(upstream.port, policy=policy) as proxy:
        server = await gateway(proxy.url, upstream={"read_timeout": READ_TIMEOUT})
        url = str(server.make_url("")).rstrip("/")
        baseline = Baseline()
        outcomes = await run_streams(url, n, dialect=dialect, abort_every=abort_every)
        tally = Tally()
        for i, outcome in enumerate(outcomes):
            tally.check(outcome, VERIFY[dialect], i)
        tally.assert_ok()
        await baseline.assert_clean(proxy, upstream)
        return tally, proxy


# ------------------------------------------------------------------------------------- tests


def test_boundary_tracker_finds_every_event_whatever_the_split() -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = head + body
    one_go = [off for off, _ in BoundaryTracker().feed(raw * 2)]
    assert len(one_go) == 2 * (len(EVENTS) + 1)
    assert one_go[0] == len(head)
    assert raw[: one_go[1]].endswith(EVENTS[0])
    assert raw[: one_go[len(EVENTS)]].endswith(EVENTS[-1])
    rng = random.Random(7)
    for _ in range(200):
        tracker = BoundaryTracker()
        cuts = sorted(rng.sample(range(1, len(raw)), 40))
        found: list[int] = []
        for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            found.extend(a + off for off, _ in tracker.feed(raw[a:b]))
        assert found == one_go[: len(EVENTS) + 1]
    crlf = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\ndata: a\r\n\r\ndata: b\r\r"
    assert BoundaryTracker().feed(crlf) == [(39, 0), (50, 1), (59, 2)]


@pytest.mark.parametrize("dialect", ["spec", "chat"])
@pytest.mark.parametrize("k", range(len(EVENTS) + 2))
async def test_truncation_at_every_event_boundary(
    k: int, dialect: str, gateway: GatewayFactory
) -> None:
    """The upstream reply cut (FIN) after its k-th event, 20 streams at once: exactly one
    verdict is right for each k."""
    n = 20
    tally, proxy = await chaos_run(gateway, TruncateAfterEvent(k), n, dialect=dialect)
    finish_seen = k >= len(EVENTS) - 1  # the finish chunk arrived: the answer is whole
    if k == 0:
        expected = "http_502_upstream_stream_broken"  # a head but no event: nothing went out
    elif finish_seen:
        expected = "completed"
    else:
        expected = "broken"
    assert tally.kinds == {expected: n}
    assert proxy.injected["truncate"] == (n if k <= len(EVENTS) else 0)


@pytest.mark.parametrize("dialect", ["spec", "chat"])
async def test_truncation_leaves_exactly_the_prefix_sent(
    dialect: str, gateway: GatewayFactory
) -> None:
    """Cut after the role chunk and t tokens: the client has exactly those t tokens."""
    for t in (0, 3, len(TOKENS)):
        policy = TruncateAfterEvent(1 + t)
        async with FaultUpstream(SCRIPT) as upstream, ChaosProxy(upstream.port, policy=policy) as p:
            server = await gateway(p.url, upstream={"read_timeout": READ_TIMEOUT})
            url = str(server.make_url("")).rstrip("/")
            (outcome,) = await run_streams(url, 1, dialect=dialect)
            assert outcome is not None
            assert VERIFY[dialect](outcome) == "broken"
            text = outcome.body.decode()
            assert all(tok in text for tok in TOKENS[:t])
            assert not any(tok in text for tok in TOKENS[t:])


def _random_bytes(make: Callable[[int], Fault], lo: int, hi: int, seed: int) -> Policy:
    rng = random.Random(seed)
    return lambda _i: make(rng.randrange(lo, hi))


FAULTS: list[tuple[str, Policy, int, set[str]]] = [
    ("pass", Pass(), 300, {"completed"}),
    ("split_1_byte", RandomSplit(seed=1, max_piece=1), 40, {"completed"}),
    ("split_random", lambda i: RandomSplit(seed=i, max_piece=40), 200, {"completed"}),
    ("drip", Drip(interval=0.001, size=2), 15, {"completed"}),
    ("reset_in_head", ResetAfter(HEAD_BYTES // 2), 60, {"http_502_connect_failed"}),
    ("reset_right_after_head", ResetAfter(HEAD_BYTES), 60, {"http_502_upstream_stream_broken"}),
    (
        "reset_in_body",
        _random_bytes(ResetAfter, HEAD_BYTES + 1, REPLY_BYTES - 40, 3),
        200,
        {"broken", "http_502_upstream_stream_broken", "completed"},
    ),
    ("stall_in_head", StallAfter(HEAD_BYTES // 2), 60, {"http_504_upstream_timeout"}),
    (
        "stall_in_body",
        _random_bytes(StallAfter, FIRST_EVENT_END, REPLY_BYTES - FRAMED[-1] - FRAMED[-2], 4),
        100,
        {"broken_timeout"},
    ),
]


@pytest.mark.parametrize(
    ("policy", "n", "allowed"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS]
)
async def test_each_fault_under_concurrency(
    policy: Policy, n: int, allowed: set[str], gateway: GatewayFactory
) -> None:
    tally, _ = await chaos_run(gateway, policy, n)
    assert set(tally.kinds) <= allowed, tally.kinds
    assert sum(tally.kinds.values()) == n


@pytest.mark.parametrize("dialect", ["spec", "chat"])
async def test_mixed_chaos_300_streams(dialect: str, gateway: GatewayFactory) -> None:
    """Every connection gets a random fault (seeded): resets, stalls and truncations anywhere
    in the reply, random splits, slow drips, pass-through - and retries reconnect through it."""
    policy = mixed_policy(2024, max_bytes=REPLY_BYTES + 50, max_events=len(EVENTS) + 1)
    tally, proxy = await chaos_run(gateway, policy, 300, dialect=dialect, abort_every=10)
    assert tally.kinds["client_aborted"] == 30
    assert tally.kinds["completed"] > 50, tally.kinds
    assert tally.kinds["broken"] > 10, tally.kinds
    assert tally.kinds["broken_timeout"] > 5, tally.kinds
    for name in ("split", "reset", "stall", "truncate", "drip"):
        assert proxy.injected[name] > 0, proxy.injected


async def test_mixed_chaos_through_the_mock_upstream_on_pooled_connections(
    mock_upstream_url: str, gateway: GatewayFactory
) -> None:
    """The real mock (uvicorn, keep-alive: the gateway pools and reuses upstream connections, so
    a fault may hit the second or third reply of a connection) in `long` mode: the same three
    verdicts; once the gateway is closed, no connection is left on either side of the proxy."""
    n_tokens = 20
    tokens = [f"tok{i} " for i in range(n_tokens)]
    port = int(mock_upstream_url.rsplit(":", 1)[1])
    policy = mixed_policy(7, max_bytes=7000, max_events=n_tokens + 4, drip_sizes=(16, 64))
    async with ChaosProxy(port, policy=policy) as proxy:
        server = await gateway(proxy.url, upstream={"read_timeout": READ_TIMEOUT})
        url = str(server.make_url("")).rstrip("/")
        baseline = Baseline()
        body = payload(test_mode="long", mock_tokens=n_tokens)
        outcomes: list[Outcome | None] = []
        for _ in range(3):  # three waves, so pooled connections are reused across replies
            outcomes += await run_streams(url, 60, body=body, abort_every=15)
        tally = Tally()
        for i, outcome in enumerate(outcomes):
            tally.check(outcome, lambda o: verify_spec(o, tokens), i)
        tally.assert_ok()
        assert tally.kinds["completed"] > 30, tally.kinds
        assert proxy.faults_injected > 20, proxy.injected
        assert proxy.downstream_total < len(outcomes) + 3 * sum(
            tally.kinds[k] for k in tally.kinds if k != "completed"
        ), "connections are pooled (fewer connections than requests plus retries)"
        await server.close()  # the gateway's session closes its idle pooled connections
        await proxy.wait_idle(5)
        me = asyncio.current_task()
        deadline = asyncio.get_running_loop().time() + 5
        while {t for t in asyncio.all_tasks() if t not in baseline.tasks and t is not me}:
            assert asyncio.get_running_loop().time() < deadline, "tasks leaked"
            await asyncio.sleep(0.05)
        assert fd_count() <= baseline.fds + 3
        assert proxy.handler_errors == 0
