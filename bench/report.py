"""The benchmark's output: a plain-text table per scenario and the `BENCHMARKS.md` writer.

Sections are built by `bench.__main__` from the raw numbers (already formatted cells); this module
only knows how to lay them out, describe the machine and format numbers and ratios.
"""

# ruff: noqa: S603  (fixed argv: the nginx/git binary found on PATH and constant arguments)

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DIRECT_NOTE",
    "Section",
    "Target",
    "fmt",
    "machine_info",
    "ms",
    "ratio",
    "render_markdown",
    "render_text",
]

DIRECT_NOTE = (
    '"direct" is the load generator talking straight to the upstream emulator over loopback, '
    "with nothing in between: the same harness process, the same pinning, the same run. It is "
    "the floor of every latency; an \"added\" latency is a system's percentile minus direct's "
    "at the same concurrency, and \"xdirect\" is a system's number divided by direct's. In "
    "throughput direct is the harness talking to itself on one core, which a relay on the "
    "other core can beat: on loopback the kernel does a socket's receive work largely on the "
    "sending "
    "CPU, so a relay takes part of the harness's TCP work onto its own core. Where the harness "
    "is the bottleneck, compare CPU per stream instead."
)


@dataclass(slots=True)
class Section:
    key: str  # "S1", "S2", ...
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    what: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def ms(seconds: float | None, digits: int = 2) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.{digits}f}"


def ratio(value: float | None, base: float | None, digits: int = 2) -> str:
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.{digits}f}x"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit(root: Path) -> str:
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        out = subprocess.run(
            [git, "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        dirty = subprocess.run(
            # The report this run rewrites is not the code it measures.
            [
                git,
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!BENCHMARKS.md",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + (" (modified)" if dirty.stdout.strip() else "")


def machine_info(root: Path, extra: Mapping[str, str]) -> dict[str, str]:
    uvloop = (
        _version("uvloop") if importlib.util.find_spec("uvloop") is not None else "not installed"
    )
    info = {
        "nproc": str(os.cpu_count() or 1),
        "cpu": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": uvloop,
        "orjson": _version("orjson"),
        "ds2oai": f"{_version('ds2oai')} @ {_git_commit(root)}",
    }
    info.update(extra)
    return info


def _widths(section: Section) -> list[int]:
    widths = [len(c) for c in section.columns]
    for row in section.rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    return widths


def render_text(sections: Sequence[Section]) -> str:
    out: list[str] = []
    for section in sections:
        widths = _widths(section)
        out.append(f"== {section.key} {section.title} ==")
        out.append("  ".join(c.rjust(w) for c, w in zip(section.columns, widths, strict=True)))
        for row in section.rows:
            out.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        out.extend(f"  note: {n}" for n in section.notes)
        out.append("")
    return "\n".join(out)


def _markdown_table(section: Section) -> list[str]:
    lines = ["| " + " | ".join(section.columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(section.columns))))
    lines[-1] += "|"
    lines.extend("| " + " | ".join(row) + " |" for row in section.rows)
    return lines


def render_markdown(
    *,
    machine: Mapping[str, str],
    date: str,
    mode: str,
    command: str,
    duration: float,
    layout: Sequence[str],
    sections: Sequence[Section],
    targets: Sequence[Target],
    notes: Sequence[str],
) -> str:
    lines = [
        "# BENCHMARKS",
        "",
        f"Written by `{command}` on {date} ({mode} run, {duration:.0f} s). Every number below "
        "comes from this one run; ratios compare systems measured in it, never numbers from "
        "another machine or day. A benchmark never fails on a number.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines.extend(f"| {k} | {v} |" for k, v in machine.items())
    lines += ["", "## Set-up", ""]
    lines.extend(f"- {item}" for item in layout)
    lines += ["", f"> {DIRECT_NOTE}", ""]
    if targets:
        lines += ["## Targets (informational)", "", "| target | goal | measured | |"]
        lines.append("|---|---|---|---|")
        for t in targets:
            mark = "-" if t.met is None else ("met" if t.met else "**not met**")
            lines.append(f"| {t.what} | {t.target} | {t.measured} | {mark} |")
        lines.append("")
    for section in sections:
        lines += [f"## {section.key} — {section.title}", ""]
        lines.extend(_markdown_table(section))
        lines.append("")
        lines.extend(f"- {n}" for n in section.notes)
        if section.notes:
            lines.append("")
    if notes:
        lines += ["## Notes", ""]
        lines.extend(f"- {n}" for n in notes)
        lines.append("")
    return "\n".join(lines)
