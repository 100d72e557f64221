"""The run checkpoint, committed as one unit.

The state after `c` completed rounds is written into a fresh folder `state/.round_<c>.tmp`, a `manifest.json` with
the sha256 of every file goes in last, the folder is renamed to `state/round_<c>`, and the commit itself is one
atomic replace of the pointer `state/checkpoint.json` (which holds the manifest's sha256). A kill before that replace
leaves the previous pointer, whose folder is still intact (older folders are deleted only after the new pointer is
in place); a kill after it leaves the new one. [`read_checkpoint`] verifies every checksum and refuses a damaged
checkpoint, naming the round the run can restart from. See docs/federated.md, "Checkpoint and resume".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from .run import CHECKPOINT_FILE, MANIFEST_FILE, RunFolder, crash_point

CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, damaged, or from an older format); the message says why and
    which round the run can restart from."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    """A verified checkpoint: the folder, the number of completed rounds and the pointer's content."""

    folder: Path
    completed_rounds: int
    pointer: dict[str, Any]
    manifest: dict[str, Any]


def begin_checkpoint(run: RunFolder, completed: int) -> Path:
    """A fresh, empty temp folder for the state after `completed` rounds (a leftover of a killed attempt is removed)."""
    tmp = run.state / f".round_{int(completed)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(run: RunFolder, tmp: Path, completed: int, pointer: dict[str, Any]) -> Path:
    """Seal `tmp` (manifest with every file's sha256), rename it to `state/round_<completed>` and commit by replacing
    the pointer atomically; then delete every other round folder, the pending folders of finished rounds and temp
    files.

    Returns:
        `Path`: the committed folder.
    """
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    known = _linked_digests(run, completed)
    digests = {}
    for p in files:
        rel = p.relative_to(tmp).as_posix()
        stat = p.stat()
        # a file hard-linked from the previous checkpoint (an unchanged client state) keeps its known digest
        digests[rel] = known.get((rel, stat.st_dev, stat.st_ino)) or sha256_file(p)
    manifest = {"format": CHECKPOINT_FORMAT, "completed_rounds": int(completed), "files": digests}
    atomic_write_json(tmp / MANIFEST_FILE, manifest)
    crash_point(f"checkpoint{completed}.after_manifest")
    final = run.round_dir(completed)
    if final.exists():  # a folder a killed attempt renamed but never committed: not pointed to, safe to drop
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run.state)
    crash_point(f"checkpoint{completed}.after_rename")
    atomic_write_json(
        run.checkpoint,
        {
            "format": CHECKPOINT_FORMAT,
            "completed_rounds": int(completed),
            "folder": final.name,
            "manifest_sha256": sha256_file(final / MANIFEST_FILE),
            **pointer,
        },
    )
    crash_point(f"checkpoint{completed}.after_commit")
    clean_state(run, keep=final.name, completed=completed)
    return final


def _linked_digests(run: RunFolder, completed: int) -> dict[tuple[str, int, int], str]:
    """`{(relative path, device, inode): sha256}` of the previous checkpoint's files (we never modify a file in
    place, so the same inode holds the same bytes)."""
    previous = run.round_dir(completed - 1)
    try:
        manifest = json.loads((previous / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for rel, digest in manifest.get("files", {}).items():
        try:
            stat = (previous / rel).stat()
        except OSError:
            continue
        out[(rel, stat.st_dev, stat.st_ino)] = digest
    return out


def clean_state(run: RunFolder, keep: str, completed: int) -> None:
    """Delete every round folder but `keep`, pending folders of rounds before `completed`, and temp files."""
    if not run.state.is_dir():
        return
    for p in run.state.iterdir():
        name = p.name
        stale = (
            (name.startswith("round_") and name != keep)
            or (name.startswith("pending_") and _suffix(name) is not None and _suffix(name) < completed)
            or (name.startswith(".") and ".tmp" in name)
        )
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for folder in run.state.glob("pending_*"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    for tmp in run.root.glob(".*.tmp"):  # atomic writes of metrics.jsonl, config.json, ... cut short by a kill
        tmp.unlink(missing_ok=True)


def _suffix(name: str) -> int | None:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


def read_checkpoint(run: RunFolder) -> Checkpoint:
    """The committed checkpoint of `run`, every file checked against its manifest.

    Raises:
        CheckpointError: no checkpoint, an older format, or a missing/damaged file (the message names the round the
            run can restart from).
    """
    if not run.checkpoint.is_file():
        raise CheckpointError(
            f"--resume: {run.checkpoint} does not exist, so {run.root} has no committed round to resume; "
            "start the run without --resume (or with --overwrite)."
        )
    try:
        pointer = json.loads(run.checkpoint.read_text())
    except ValueError as err:
        raise CheckpointError(f"--resume: {run.checkpoint} is not valid JSON ({err}); {_restart_hint(run)}") from None
    if pointer.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"--resume: {run.checkpoint} was written by an older hf_perfit (checkpoint format "
            f"{pointer.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}); it can restart from round 0 only: run "
            "again with --overwrite."
        )
    completed = int(pointer["completed_rounds"])
    folder = run.state / str(pointer.get("folder", ""))
    problem = _verify(folder, pointer)
    if problem is not None:
        raise CheckpointError(
            f"--resume: the checkpoint of round {completed - 1} ({folder}) is damaged: {problem}. {_restart_hint(run)}"
        )
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    return Checkpoint(folder, completed, pointer, manifest)


def _verify(folder: Path, pointer: dict[str, Any]) -> str | None:
    if folder.name != f"round_{pointer.get('completed_rounds')}" or not folder.is_dir():
        return f"the folder {folder.name!r} it points to is missing"
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"{MANIFEST_FILE} is missing"
    if sha256_file(manifest_path) != pointer.get("manifest_sha256"):
        return f"{MANIFEST_FILE} does not match the sha256 recorded in {CHECKPOINT_FILE}"
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def _restart_hint(run: RunFolder) -> str:
    return (
        "No intact checkpoint is left, so the run can restart from round 0 only: run again with --overwrite "
        f"(this deletes {run.root})."
    )


__all__ = ["Checkpoint", "CheckpointError", "begin_checkpoint", "commit_checkpoint", "read_checkpoint"]
