"""Command line: `ds2oai serve` and `ds2oai check-config`. The only place that parses argv."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import cast

from aiohttp import web

from ds2oai import __version__, logs
from ds2oai.chain import build_middleware
from ds2oai.config import Config, load_config
from ds2oai.errors import ConfigError
from ds2oai.middleware import BUILTINS
from ds2oai.server import SHUTDOWN_MARGIN, create_app

__all__ = ["main"]

log = logging.getLogger("ds2oai")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds2oai",
        description="An OpenAI-compatible streaming gateway in front of DeepSeek's Chat "
        "Completions API.",
    )
    parser.add_argument("--version", action="version", version=f"ds2oai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="bind address (default from config/HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config/PORT, 8000)")
    serve.add_argument("--config", help="TOML config file (default $DS2OAI_CONFIG)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    """uvloop when configured and installed (it is a dependency on Linux), else asyncio's."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - e.g. a platform without wheels
            log.warning("server.uvloop is on but uvloop is not installed; using asyncio's loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# Each stream holds two descriptors (client and upstream sockets); a few more for the store,
# logs and the listening socket. Below this many, the limit is reported at start-up.
_FEW_FILES = 4096


def _raise_open_files() -> int:
    """Raise the soft open-files limit to the hard one (as Go's runtime does); returns it.

    The usual default soft limit, 1024, caps a gateway at about 500 concurrent streams: past
    it, accept() and upstream connects fail with EMFILE (the latter answered 502). The hard
    limit is the administrator's choice; the soft one is only a default nobody chose."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # RLIM_INFINITY is refused for NOFILE on Linux (nr_open caps it): stay finite.
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # keep the soft limit; the warning below still reports it
    return soft


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    A read that brings many events at once (a long answer arriving whole, or a backlog when the
    gateway falls behind) builds buffers of hundreds of kilobytes and frees them a moment later.
    With glibc's defaults the heap top is trimmed after each and grown again for the next (or
    the buffer is mmapped and unmapped), and the kernel zeroes the pages every time: with a
    2,000-chunk answer in one read that was 2.6 ms of system time per stream against 0.25 ms
    kept (docs/decisions.md). Up to 16 MiB of free heap stays mapped; buffers under 8 MiB come
    from the heap. Elsewhere (musl, macOS) nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 8 << 20)
    mallopt(_M_TRIM_THRESHOLD, 16 << 20)


def _serve_one(config: Config) -> int:
    logs.configure(config.logging.level)
    _tune_malloc()
    app = create_app(config, owns_process=True)
    host, port = config.server.host, config.server.port

    def ready(_message: object) -> None:
        log.info("ready", extra={"host": host, "port": port})

    # Everything loaded so far lives as long as the process: move it out of the cyclic GC's
    # reach, so the collections that streams trigger never walk it.
    gc.collect()
    gc.freeze()
    # Per-request garbage is freed by reference counting; the cyclic collector only has to
    # catch the odd cycle. Its default (a young collection every 700 allocations) walks every
    # in-flight stream's objects again and again: 2.6 % of the instructions per stream at 128
    # concurrent streams (callgrind). 10,000 keeps cycles short-lived and that cost negligible.
    gc.set_threshold(10_000, 10, 10)

    try:
        web.run_app(
            app,
            loop=_new_loop(config.server.uvloop),
            host=host,
            port=port,
            handler_cancellation=True,
            # aiohttp's keep-alive timer also runs from accept until the first request head is
            # complete, and bytes trickling in do not reset it: it is our header read timeout.
            keepalive_timeout=config.server.header_timeout,
            backlog=config.server.backlog,
            access_log=None,
            shutdown_timeout=config.server.shutdown_grace + SHUTDOWN_MARGIN,
            print=ready,
            reuse_port=config.server.workers > 1 or None,
        )
    except OSError as exc:  # cannot bind (in use, not allowed, no such address): one line
        log.error(
            "cannot serve on %s:%s: %s", host, port, exc.strerror or exc, extra={"errno": exc.errno}
        )
        return 1
    return 0


def _worker(config: Config, parent: int) -> None:
    """One of `--workers N`: ends with its parent, whatever way the parent goes."""
    # Its own process group: a terminal's Ctrl-C (sent to the whole foreground group) reaches
    # the supervisor only, which passes one SIGTERM on; a second signal would skip the drain.
    os.setpgid(0, 0)
    _die_with_parent(parent)
    sys.exit(_serve_one(config))


def _die_with_parent(parent: int) -> None:
    # Linux's PR_SET_PDEATHSIG: SIGTERM (a normal drain) when the parent dies, even by
    # SIGKILL, so no orphaned worker keeps serving the port. Elsewhere: nothing to do.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        log.warning(
            "cannot ask to end with the supervisor (prctl): this worker may outlive it",
            extra={"errno": ctypes.get_errno()},
        )
        return
    if os.getppid() != parent:  # the parent was already gone before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        server = config.server
        if args.host:
            server = dataclasses.replace(server, host=args.host)
        if args.port is not None:
            server = dataclasses.replace(server, port=args.port)
        if args.workers is not None:
            if args.workers < 1:
                raise ConfigError("--workers: must be at least 1")
            server = dataclasses.replace(server, workers=args.workers)
        config = dataclasses.replace(config, server=server)
        build_middleware(config, BUILTINS)  # refuse to start on a bad chain, before binding
    except ConfigError as exc:
        print(f"ds2oai: config error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.logging.level)
    open_files = _raise_open_files()
    if open_files < _FEW_FILES:
        log.warning(
            "the open-files limit is low: each stream needs two descriptors; raise the hard "
            "limit (ulimit -Hn, LimitNOFILE=) for more concurrent streams",
            extra={"open_files": open_files},
        )
    if not (config.auth.api_keys or config.auth.clients) and not _is_loopback(config.server.host):
        log.warning(
            "no [auth] api_keys configured and binding a non-loopback address: anyone who can "
            "reach this port can use the upstream key",
            extra={"host": config.server.host},
        )
    if config.server.workers == 1:
        return _serve_one(config)
    return _supervise(config)


# A worker that ends this soon after it started is not restarted (it would fail again: the
# port taken, say); the others are stopped and `serve` exits 1.
_QUICK_EXIT = 5.0


def _supervise(config: Config) -> int:
    """`--workers N`: N processes on one port (SO_REUSEPORT: the kernel spreads connections),
    their metrics aggregated through files in one directory. A worker that dies while serving
    is logged and replaced; SIGTERM/SIGINT/SIGHUP drain all of them."""
    metrics_dir = tempfile.mkdtemp(prefix="ds2oai-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    failed = False
    workers: list[multiprocessing.process.BaseProcess] = []  # the current ones
    running: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}  # by sentinel

    def start(replacing: multiprocessing.process.BaseProcess | None = None) -> None:
        worker = ctx.Process(target=_worker, args=(config, os.getpid()), daemon=False)
        worker.start()
        if replacing is None:
            workers.append(worker)
        else:
            workers[workers.index(replacing)] = worker
        running[worker.sentinel] = (worker, time.monotonic())
        if stopping and worker.pid is not None:  # a signal came while it was starting
            os.kill(worker.pid, signal.SIGTERM)

    def forward(signum: int, _frame: object) -> None:
        # Each worker drains its own streams on SIGTERM; a second signal is passed on too.
        nonlocal stopping
        stopping = True
        for worker, _ in list(running.values()):
            if worker.pid is not None and worker.exitcode is None:
                with contextlib.suppress(ProcessLookupError):  # it ended in between
                    os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # not under `nohup`
        signal.signal(signal.SIGHUP, forward)  # the terminal went away: drain, as workers do
    try:
        for _ in range(config.server.workers):
            start()
        while running:
            # Every worker not yet handled, dead ones too (their sentinels are ready at once).
            for sentinel in multiprocessing.connection.wait(list(running)):
                worker, since = running.pop(cast(int, sentinel))
                worker.join()
                if stopping:
                    continue
                lived = time.monotonic() - since
                quick = lived < _QUICK_EXIT
                log.error(
                    "a worker exited soon after it started; stopping"
                    if quick
                    else "a worker exited while serving; starting another",
                    extra={"pid": worker.pid, "exitcode": worker.exitcode, "seconds": lived},
                )
                if quick:
                    failed = True
                    forward(signal.SIGTERM, None)
                else:
                    start(replacing=worker)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # While stopping, a worker still starting up may end by SIGTERM's default action.
    clean = (0, -signal.SIGTERM) if stopping else (0,)
    return 1 if failed or any(w.exitcode not in clean for w in workers) else 0


def check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        build_middleware(config, BUILTINS)
    except ConfigError as exc:
        message = str(exc)  # file errors name the file already, environment ones say so
        if not message.startswith((f"{args.file}:", "environment:")):
            message = f"{args.file}: {message}"
        print(message, file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return check_config(args)
