"""A naive aiohttp byte relay: the floor the gateway's OpenAI chat route is compared with.

POST in, POST upstream, copy the upstream body downstream with `iter_any()` — no parsing, no
re-framing, no middleware, no logging. Whatever the gateway does on top of this costs CPU; the
benchmark shows how much. `python -m bench.relay --port P --upstream http://127.0.0.1:U`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

__all__ = ["create_app", "main"]

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": upstream.headers.get("Content-Type", "text/event-stream")},
        )
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=300)
    app[SESSION] = aiohttp.ClientSession(connector=connector, trust_env=False)
    yield
    await app[SESSION].close()


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--upstream", default="http://127.0.0.1:9001")
    args = parser.parse_args(argv)
    web.run_app(
        create_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
