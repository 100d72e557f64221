"""Shared by the benchmark scripts: the machine description, the command line, and an atomic in-place update of one
section of `docs/benchmarks.md` (every script owns one `## ...` section and leaves the others alone)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DOC_HEADER = "# Benchmarks"
DOC_INTRO = "Every section gives the exact command that produced it and the machine it ran on."


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cores": f"{usable} usable ({os.cpu_count()} logical)",
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "libs": f"transformers {transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_s = str(script)
    return shlex.join(["python", script_s, *sys.argv[1:]])


def update_doc(path: Path, title: str, section: str) -> None:
    """Replace (or append) the section headed `title` (a `## ...` line) of `path`, keeping every other section;
    atomic (temp file + rename)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = text.splitlines()
    if not lines or lines[0].strip() != DOC_HEADER:
        lines = [DOC_HEADER, "", DOC_INTRO, "", *lines]
    elif DOC_INTRO not in text:
        lines = [lines[0], "", DOC_INTRO, *lines[1:]]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    new = section.strip("\n").splitlines()
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *new]
    else:
        end, fenced = len(lines), False
        for i in range(start + 1, len(lines)):
            if lines[i].lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced and lines[i].startswith("## "):
                end = i
                break
        tail = lines[end:]
        lines = lines[:start] + new + ([""] + tail if tail else [])
    out = "\n".join(lines).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(out)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def machine_lines(info: dict[str, str] | None = None) -> str:
    """The machine as a markdown bullet list."""
    m = info or machine_info()
    return (
        f"- CPU: {m['cpu']}, {m['cores']} cores\n- torch {m['torch']}; {m['libs']}\n"
        f"- date: {m['date']}; repository commit {m['commit']}\n"
        f"- load average (1 min) at the end: {os.getloadavg()[0]:.2f} (a shared machine when > cores)\n"
    )


def command_and_machine(machine: list[str] | None = None) -> list[str]:
    """The "Command:" and "Machine:" blocks every section of docs/benchmarks.md opens with (markdown lines);
    `machine` replaces the machine's bullet lines (a script that measured elsewhere, e.g. in a child process)."""
    bullets = machine if machine is not None else machine_lines().rstrip("\n").split("\n")
    return ["Command:", "", "```bash", command_line(), "```", "", "Machine:", "", *bullets]


def publish(title: str, section: str, write: bool) -> None:
    """Print a section; with `write`, also replace its part of docs/benchmarks.md (the section headed `title`)."""
    print(section)
    if write:
        update_doc(DOC_PATH, title, section)
        print(f"wrote {DOC_PATH}")
