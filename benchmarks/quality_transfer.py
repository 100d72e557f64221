"""Moving issue 18's cached quality cells from a GPU machine to this one: `pack` the records of every cell under a
root into one archive small enough to come back from the GPU machine, `unpack` it into this machine's cache.

Why a script of its own: a GPU session trains the cells of `quality_scale.py` under `/tmp` (lost when the machine goes
back) and can return only a few files of at most 16 MiB. A finished FLAN-8 cell is ~38 MB, and all but ~100 KB of it
are LoRA tensors (each client's adapter and state, the strategy's state) that `quality_scale.py report` never reads.
`pack` keeps what the report reads (records, config, wall time, ROUGE-L, budget, `results.md`, the checkpoint
pointer and run marker) plus, for PerFIT-family cells, the mask overlap computed from the strategy state before that
state is left behind (`mask_overlap.json`, read by the report when the state is absent). `unpack` adds only finished
cells, and only where this machine has no folder for the cell: a local run, finished or not, is never overwritten.
Each imported cell gets `imported.json` (where and when it ran); `quality_scale.py` neither resumes nor forks
(`fedit_ft` from `fedit`) from such a cell, since its tensors stayed on the GPU machine.

    # on the GPU machine, after the cells ran (benchmarks/gpu_quality.sh does this):
    python benchmarks/quality_transfer.py pack --root /tmp/q --out $OUT/quality_records.tar.gz
    # here, on the archive the device tool brought back:
    python benchmarks/quality_transfer.py unpack <files_at>/quality_records.tar.gz
    python benchmarks/quality_scale.py report
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import quality_grid as grid  # noqa: E402
import quality_run as qrun  # noqa: E402
import quality_scale_report as qr  # noqa: E402
import quality_setup as qset  # noqa: E402

from hf_perfit._io import atomic_write_bytes  # noqa: E402

# what the report reads from a cell folder (relative paths); everything else there is tensors or plots
CELL_FILES = (
    "metrics.jsonl",
    "config.json",
    "results.md",
    qrun.WALL_FILE,
    qrun.ROUGE_FILE,
    qrun.BUDGET_FILE,
    qset.SETTINGS_FILE,
    "state/checkpoint.json",
    "state/run.json",
    qr.MASK_OVERLAP_FILE,
)
IMPORTED_FILE = grid.IMPORTED_FILE
MAX_BYTES = 16 * 2**20  # the device tool returns files of at most 16 MiB


def cell_folders(root: Path) -> list[Path]:
    """Every `<setting>/seed<k>/<method>` folder under `root` that holds records. Not a hidden folder: those are the
    temp folders of an import or a save in progress (`.import-*`, `.save-*`), or one a killed process left."""
    return sorted(p.parent for p in root.glob("*/seed*/*/metrics.jsonl") if not p.parent.name.startswith("."))


def keep_mask_overlap(folder: Path, cell: dict[str, Any]) -> None:
    """Write the cell's mask overlap (`quality_scale_report.mask_overlap`) into its folder, next to its records: it is
    computed from the strategy state, which neither an archive nor the store keeps. Nothing for a run without masks."""
    overlap = qr.mask_overlap(cell)
    if overlap is not None:
        qrun._write_json(folder / qr.MASK_OVERLAP_FILE, overlap)


def pack(root: Path, out: Path) -> dict[str, Any]:
    """Write the records of every cell under `root` (and each setting's `base/` ROUGE-L) to the gzipped tar `out`.

    Returns:
        `dict`: `cells` (relative paths packed), `finished` (those finished), `bytes` (archive size).

    Raises:
        `SystemExit`: nothing to pack, or an archive over 16 MiB (pack one setting at a time with `--setting`).
    """
    cells = cell_folders(root)
    if not cells:
        raise SystemExit(f"pack: no cell with records under {root}; run `quality_scale.py run --root {root}` first.")
    finished: list[str] = []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for folder in cells:
            rel = folder.relative_to(root)
            cell = qr.read_cell(folder)
            if cell is not None and cell["finished"]:
                finished.append(str(rel))
            if cell is not None:
                keep_mask_overlap(folder, cell)
            for name in CELL_FILES:
                if (folder / name).is_file():
                    tar.add(folder / name, arcname=str(rel / name))
        for base in sorted(root.glob("*/base/*.json")):
            tar.add(base, arcname=str(base.relative_to(root)))
        info = tarfile.TarInfo("packed.json")  # where and when the cells ran, for `imported.json`
        meta = json.dumps({"host": socket.gethostname(), "date": qrun._now(), "device": _device()}).encode()
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    data = buffer.getvalue()
    if len(data) > MAX_BYTES:
        raise SystemExit(
            f"pack: the archive would be {len(data) / 2**20:.1f} MiB, over the 16 MiB a file the GPU machine can "
            "return; pack one setting at a time (`--setting NAME`, one archive each)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    from hf_perfit._io import atomic_write_bytes

    atomic_write_bytes(out, data)
    return {"cells": [str(c.relative_to(root)) for c in cells], "finished": finished, "bytes": len(data)}


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - torch is always there in practice
        return "unknown"


def unpack(archive: Path, root: Path) -> dict[str, list[str]]:
    """Add the finished cells of `archive` that `root` lacks; never touch a folder `root` already has.

    Returns:
        `dict`: `imported`, `kept_local` (a folder existed here), `unfinished` (left out: they cannot resume here).

    Raises:
        `SystemExit`: a missing or unreadable archive.
    """
    if not archive.is_file():
        raise SystemExit(f"unpack: {archive} does not exist; give the path of the archive `pack` wrote.")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=root) as tmp_name:
        tmp = Path(tmp_name)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")  # refuses absolute paths, `..` and links out of tmp
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SystemExit(
                f"unpack: {archive} is not a readable archive of `pack` ({err}); fetch it again."
            ) from err
        meta_path = tmp / "packed.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return _import_cells(tmp, root, {**meta, "archive": archive.name}, move=True)


def _finished_cells(root: Path, unfinished: list[str]):
    """`(folder, path relative to root, read_cell)` of every finished cell under `root`; the others' relative paths
    go to `unfinished`."""
    for folder in cell_folders(root):
        rel = folder.relative_to(root)
        cell = qr.read_cell(folder)
        if cell is None or not cell["finished"]:
            unfinished.append(str(rel))
            continue
        yield folder, rel, cell


def _import_cells(source: Path, root: Path, meta: dict[str, Any], move: bool) -> dict[str, list[str]]:
    """The finished cells under `source` that `root` has no folder for, into `root`, each marked `imported.json`
    (`meta` + the time; a mark the cell already carries, e.g. the GPU it ran on, is kept under `first`). A cell
    appears whole or not at all: it is assembled in a temp folder under `root`, then renamed into place."""
    report: dict[str, list[str]] = {"imported": [], "kept_local": [], "unfinished": []}
    root.mkdir(parents=True, exist_ok=True)
    for folder, rel, _ in _finished_cells(source, report["unfinished"]):
        target = root / rel
        if target.exists():
            report["kept_local"].append(str(rel))
            continue
        mark = {**meta, "imported": qrun._now()}
        if (folder / IMPORTED_FILE).is_file():
            mark["first"] = json.loads((folder / IMPORTED_FILE).read_text())
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            staged = folder
        else:
            staged = Path(tempfile.mkdtemp(prefix=".import-", dir=target.parent))
            _copy_records(folder, staged)
        qrun._write_json(staged / IMPORTED_FILE, mark)
        try:
            os.replace(staged, target)  # same filesystem: the cell appears whole or not at all
        except OSError:
            if not move:  # our own temp copy: never left behind, whatever the failure
                shutil.rmtree(staged, ignore_errors=True)
            # Two `run`s started together on a fresh checkout restore the same store at once: the other one
            # renamed its copy into place between our check and our rename. Its copy is the same records: keep it.
            if not target.is_dir():
                raise
            report["kept_local"].append(str(rel))
            continue
        report["imported"].append(str(rel))
    for base in sorted(source.glob("*/base/*.json")):
        target = root / base.relative_to(source)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # via a temp file + rename, so that a concurrent `run` reading the base evaluation never sees half of it
            atomic_write_bytes(target, base.read_bytes())
    return report


def _copy_records(folder: Path, dest: Path) -> None:
    """The files of `CELL_FILES` that `folder` has, into `dest` (same relative paths). Not `imported.json`: both
    callers write the mark the copy should carry."""
    for name in CELL_FILES:
        if (folder / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, dest / name)


def _stored_mark(folder: Path, store: Path) -> dict[str, Any] | None:
    """`folder`'s `imported.json` as `store` keeps it: without the layers a `restore` from that store added. Such a
    layer says only that the cell came back from the store, so a fresh checkout's report (restore, then save) leaves
    the stored cells as they were instead of rewriting every mark with one more layer."""
    path = folder / IMPORTED_FILE
    mark = json.loads(path.read_text()) if path.is_file() else None
    while isinstance(mark, dict) and mark.get("store") == qset._rel(store):
        mark = mark.get("first")
    return mark


def _same_records(folder: Path, stored: Path, store: Path) -> bool:
    """Whether the stored cell `stored` already holds `folder`'s records (and its mark, as `_stored_mark`)."""
    mark = stored / IMPORTED_FILE
    return _stored_mark(folder, store) == (json.loads(mark.read_text()) if mark.is_file() else None) and all(
        (folder / n).is_file() == (stored / n).is_file()
        and (not (folder / n).is_file() or (folder / n).read_bytes() == (stored / n).read_bytes())
        for n in CELL_FILES
    )


def save(root: Path, store: Path) -> dict[str, list[str]]:
    """Keep the records of every finished cell under `root` in `store` (the repository's docs/results/cells), where
    they outlive the machine: a cell's folder under `outputs/` is scratch that a fresh checkout does not have.

    A cell the store lacks is added; one whose records differ (the cell was rerun) replaces the stored one whole;
    an unfinished cell is left out. Each cell is written to a temp folder beside its place and renamed into it; a
    replaced one is moved aside first and deleted only once the new one is in place.

    Returns:
        `dict`: `saved` (added or replaced), `unchanged`, `unfinished` (relative cell paths).
    """
    report: dict[str, list[str]] = {"saved": [], "unchanged": [], "unfinished": []}
    for folder, rel, cell in _finished_cells(root, report["unfinished"]):
        keep_mask_overlap(folder, cell)
        target = store / rel
        if target.is_dir() and _same_records(folder, target, store):
            report["unchanged"].append(str(rel))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".save-", dir=target.parent))
        _copy_records(folder, staged)
        if (mark := _stored_mark(folder, store)) is not None:
            qrun._write_json(staged / IMPORTED_FILE, mark)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
            os.replace(target, old / "cell")
        os.replace(staged, target)
        if old is not None:
            shutil.rmtree(old)
        report["saved"].append(str(rel))
    for base in sorted(root.glob("*/base/*.json")):
        target = store / base.relative_to(root)
        if not target.is_file() or target.read_bytes() != base.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            from hf_perfit._io import atomic_write_bytes

            atomic_write_bytes(target, base.read_bytes())
    return report


def restore(store: Path, root: Path) -> dict[str, list[str]]:
    """The stored cells (`save`) that `root` has no folder for, copied into `root` as imported cells: read by the
    report, never resumed or forked from (their tensors were not kept). A local folder is never touched."""
    if not store.is_dir():
        return {"imported": [], "kept_local": [], "unfinished": []}
    return _import_cells(store, root, {"store": qset._rel(store)}, move=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="archive the records of every cell under --root")
    p.add_argument("--root", type=Path, required=True, help="the cells (`quality_scale.py run --root`)")
    p.add_argument("--out", type=Path, required=True, help="the archive to write (.tar.gz)")
    p.add_argument("--setting", help="only this setting's cells")
    u = sub.add_parser("unpack", help="add the finished cells of an archive to --root")
    u.add_argument("archive", type=Path)
    u.add_argument("--root", type=Path, default=grid.DEFAULT_ROOT, help=f"default: {grid.DEFAULT_ROOT}")
    args = parser.parse_args(argv)
    if args.command == "pack":
        root = args.root.resolve()
        if args.setting:
            if args.setting not in grid.SETTINGS:
                raise SystemExit(f"--setting {args.setting}: unknown; allowed: {', '.join(grid.SETTINGS)}.")
            with tempfile.TemporaryDirectory() as view:  # a root holding only that setting's folder
                name = grid.storage(grid.SETTINGS[args.setting]).name
                os.symlink(root / name, Path(view) / name)
                out = pack(Path(view), args.out)
        else:
            out = pack(root, args.out)
        print(f"packed {len(out['cells'])} cells ({len(out['finished'])} finished), {out['bytes'] / 2**20:.2f} MiB")
        for c in out["cells"]:
            print(f"  {c}{'' if c in out['finished'] else '  (unfinished: unpack leaves it out)'}")
    else:
        out = unpack(args.archive, args.root.resolve())
        for key, names in out.items():
            print(f"{key}: {len(names)}" + "".join(f"\n  {n}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
