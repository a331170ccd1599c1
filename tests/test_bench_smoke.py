"""`python -m bench --quick` runs end to end, so the benchmark cannot rot.

It starts the upstream emulator, the naive relay and `ds2oai serve` (one worker, then two), drives
every scenario with tiny counts and checks what the benchmark itself reports: each scenario's
table, a `BENCH_RESULT` JSON line and that every stream completed. No speed number is asserted:
a benchmark never fails on a number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the benchmark reads /proc and pins CPUs"
)


def _bench_result(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    assert len(lines) == 1, stdout[-2000:]
    result: dict[str, Any] = json.loads(lines[0].removeprefix("BENCH_RESULT "))
    return result


def test_quick_bench_runs_every_scenario_and_completes_every_stream(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    env = {**os.environ}
    for key in ("UPSTREAM_BASE_URL", "DEEPSEEK_API_KEY", "DS2OAI_CONFIG", "HOST", "PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-nginx", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("S1", "S2", "S3", "S4"):
        assert f"== {key} " in proc.stdout, key

    result = _bench_result(proc.stdout)
    assert result["mode"] == "quick"
    assert result["scenarios"] == ["S1", "S2", "S3", "S4"]
    assert result["streams_total"] > 0
    assert result["incomplete_total"] == 0, result["incomplete_causes"]
    assert result["all_complete"] is True
    runs = result["results"]
    for key in ("S1", "S2", "S3"):
        assert runs[key], key
        assert all(run["incomplete"] == 0 for run in runs[key]), runs[key]
    assert {run["system"] for run in runs["S1"]} >= {"direct", "relay", "gw-spec", "gw-chat"}
    assert all(step["incomplete"] == 0 for r in runs["S4"] for step in r["steps"])
    assert "nginx" in " ".join(result["notes"])  # skipped, and said so

    report = out.read_text(encoding="utf-8")
    for key in ("S1", "S2", "S3", "S4"):
        assert f"## {key} " in report, key
    assert "## Machine" in report
    assert '"direct"' in report


def test_harness_loop_is_uvloop_unless_asked_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    from bench.__main__ import harness_loop_factory

    assert harness_loop_factory("auto") is uvloop.new_event_loop
    assert harness_loop_factory("uvloop") is uvloop.new_event_loop
    assert harness_loop_factory("asyncio") is None

    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError
    assert harness_loop_factory("auto") is None
    with pytest.raises(SystemExit, match="not installed"):
        harness_loop_factory("uvloop")
