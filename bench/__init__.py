"""`python -m bench`: the load benchmark of SPEC §7 (`make bench`).

Pieces:

- `bench.upstream` — a fast DeepSeek-style upstream emulator (raw asyncio protocol, keep-alive,
  chunked, precomputed bytes per (chunks, inter-chunk delay, time to first chunk));
- `bench.load` — the load generator (raw asyncio HTTP/1.1 client on keep-alive connections) that
  records time to first token, per-frame lateness, total time and completion of every stream;
- `bench.relay` — a naive aiohttp byte relay, the floor the gateway's chat route is held to;
- `bench.nginx` — Debian's nginx as the reference relay (`proxy_buffering off`);
- `bench.report` — the printed table and the `BENCHMARKS.md` writer;
- `bench.__main__` — the orchestration: processes, CPU pinning, scenarios S1-S4.

A benchmark never fails on a number: the exit status is non-zero only when the harness itself
could not run (a process did not start). Incomplete streams are reported (table, `BENCH_RESULT`
JSON line) and checked by `tests/test_bench_smoke.py`, not turned into an exit status.
"""
