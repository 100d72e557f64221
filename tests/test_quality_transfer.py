"""benchmarks/quality_transfer.py: cells trained on a GPU machine come back as records only and read exactly as the
cells they were packed from; nothing local is overwritten; an imported cell is never resumed or forked from; a
fine-tuning cell waits while a parallel worker computes the run it forks from."""

from __future__ import annotations

import json
import os
import socket
import sys
import tarfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality_grid as grid  # noqa: E402
import quality_scale as qs  # noqa: E402
import quality_scale_report as qr  # noqa: E402
import quality_transfer as qt  # noqa: E402

COMMON = ["--tiny", "--setting", "flan8_recipe", "--seeds", "0", "--threads", "1", "--no-report"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A root with the tiny `fedit` and `perfit` cells of seed 0, finished."""
    root = tmp_path_factory.mktemp("gpu")
    assert qs.main(["run", *COMMON, "--methods", "fedit", "perfit", "--root", str(root)]) == 0
    return root


def _cell(root: Path, method: str) -> Path:
    return root / "flan8_recipe" / "seed0" / method


def test_packed_cells_read_as_the_originals(trained, tmp_path, capsys):
    archive = tmp_path / "out" / "records.tar.gz"
    assert qt.main(["pack", "--root", str(trained), "--out", str(archive)]) == 0
    assert "packed 2 cells (2 finished)" in capsys.readouterr().out
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith(".safetensors")]  # records only: no tensor travels
    assert archive.stat().st_size < 1_000_000

    here = tmp_path / "here"
    assert qt.main(["unpack", str(archive), "--root", str(here)]) == 0
    assert "imported: 2" in capsys.readouterr().out
    for method in ("fedit", "perfit"):
        original, imported = qr.read_cell(_cell(trained, method)), qr.read_cell(_cell(here, method))
        for key in ("finished", "done", "total", "ppl", "loss", "bytes_up", "bytes_down", "wall_s", "config"):
            assert imported[key] == original[key], key
        assert json.loads((_cell(here, method) / grid.IMPORTED_FILE).read_text())["archive"] == "records.tar.gz"
    # PerFIT's mask overlap was computed from the strategy state before packing; the import reads the same numbers
    assert qr.mask_overlap(qr.read_cell(_cell(here, "perfit"))) == qr.mask_overlap(
        qr.read_cell(_cell(trained, "perfit"))
    )
    assert qr.mask_overlap(qr.read_cell(_cell(here, "fedit"))) is None

    # the report over the imported cells gives the same quality.json as over the originals
    for root in (trained, here):
        argv = ["report", "--tiny", "--setting", "flan8_recipe", "--root", str(root), "--no-write"]
        assert qs.main([*argv, "--results", str(root / "q.json")]) == 0
    assert json.loads((here / "q.json").read_text()) == json.loads((trained / "q.json").read_text())

    # a second unpack changes nothing that is already here
    stamps = {p: p.stat().st_mtime_ns for p in here.rglob("*") if p.is_file()}
    assert qt.main(["unpack", str(archive), "--root", str(here)]) == 0
    assert "kept_local: 2" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_unfinished_cells_stay_out_and_local_runs_stay(trained, tmp_path, capsys):
    gpu = tmp_path / "gpu"
    for method in ("fedit", "perfit"):
        src, dst = _cell(trained, method), _cell(gpu, method)
        dst.mkdir(parents=True)
        for name in qt.CELL_FILES:
            if (src / name).is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                (dst / name).write_bytes((src / name).read_bytes())
    (_cell(gpu, "perfit") / "results.md").unlink()  # cut short before its end
    archive = tmp_path / "r.tar.gz"
    assert qt.main(["pack", "--root", str(gpu), "--out", str(archive)]) == 0
    assert "(unfinished: unpack leaves it out)" in capsys.readouterr().out
    here = tmp_path / "here"
    _cell(here, "fedit").mkdir(parents=True)
    (_cell(here, "fedit") / "mine.txt").write_text("a local run")
    assert qt.main(["unpack", str(archive), "--root", str(here)]) == 0
    out = capsys.readouterr().out
    assert "imported: 0" in out and "kept_local: 1" in out and "unfinished: 1" in out
    assert (_cell(here, "fedit") / "mine.txt").read_text() == "a local run"
    assert not _cell(here, "perfit").exists()
    assert not [p for p in here.rglob(".unpack-*")]  # the temp folder is gone


def test_bad_archives_fail_naming_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        qt.main(["unpack", str(tmp_path / "nope.tar.gz"), "--root", str(tmp_path / "r")])
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tar archive")
    with pytest.raises(SystemExit, match="not a readable archive.*fetch it again"):
        qt.main(["unpack", str(broken), "--root", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="no cell with records"):
        qt.main(["pack", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "x.tar.gz")])
    assert not (tmp_path / "x.tar.gz").exists()


def test_an_imported_fedit_is_not_forked(trained, tmp_path, capsys):
    archive = tmp_path / "r.tar.gz"
    assert qt.main(["pack", "--root", str(trained), "--out", str(archive)]) == 0
    here = tmp_path / "here"
    assert qt.main(["unpack", str(archive), "--root", str(here)]) == 0
    args = qs.parse_args(["plan", *COMMON, "--root", str(trained), "--methods", "fedit_ft"])
    (cell,) = qs.plan(args, [grid.SETTINGS["flan8_recipe"]], trained)  # the config the imported fedit was run with
    assert grid.fork_source(_cell(here, "fedit_ft"), cell["config"]) is None  # its client states stayed on the GPU
    (_cell(here, "fedit") / grid.IMPORTED_FILE).unlink()
    assert grid.fork_source(_cell(here, "fedit_ft"), cell["config"]) == _cell(here, "fedit")  # the mark is why


def test_fine_tuning_waits_while_another_worker_computes_its_source(trained, tmp_path):
    args = qs.parse_args(["plan", *COMMON, "--root", str(tmp_path), "--methods", "fedit", "fedit_ft"])
    cells = qs.plan(args, [grid.SETTINGS["flan8_recipe"]], tmp_path)
    ft = next(c for c in cells if c["method"] == "fedit_ft")
    assert qs._fork_source_running(ft, cells) is None  # nobody computes fedit
    lock = grid.CellLock(next(c for c in cells if c["method"] == "fedit")["folder"])
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live holder
    assert qs._fork_source_running(ft, cells) == "fedit"
    lock.path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # a gone process
    assert qs._fork_source_running(ft, cells) is None


def test_saved_records_restore_the_cells_in_a_fresh_checkout(trained, tmp_path, capsys):
    store = tmp_path / "store"
    out = qt.save(trained, store)
    assert sorted(out["saved"]) == ["flan8_recipe/seed0/fedit", "flan8_recipe/seed0/perfit"]
    assert not [p for p in store.rglob("*.safetensors")]  # records only
    assert not [p for p in store.rglob(".save-*")] and not [p for p in store.rglob(".old-*")]
    assert qt.save(trained, store)["unchanged"] == out["saved"]  # nothing rewritten when nothing changed

    fresh = tmp_path / "fresh"  # a new checkout: no outputs/, the store committed
    assert sorted(qt.restore(store, fresh)["imported"]) == out["saved"]
    for method in ("fedit", "perfit"):
        original, restored = qr.read_cell(_cell(trained, method)), qr.read_cell(_cell(fresh, method))
        for key in ("finished", "done", "total", "ppl", "loss", "bytes_up", "bytes_down", "wall_s", "config"):
            assert restored[key] == original[key], key
        assert "store" in json.loads((_cell(fresh, method) / grid.IMPORTED_FILE).read_text())
    assert qr.mask_overlap(qr.read_cell(_cell(fresh, "perfit"))) == qr.mask_overlap(
        qr.read_cell(_cell(trained, "perfit"))
    )
    stamps = {p: p.stat().st_mtime_ns for p in fresh.rglob("*") if p.is_file()}
    assert qt.restore(store, fresh)["kept_local"] == out["saved"]  # a folder that is here is never touched
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a rerun cell replaces its stored records whole
    results = _cell(trained, "fedit") / "results.md"
    original_text = results.read_text()
    try:
        results.write_text(original_text + "\nrerun\n")
        assert qt.save(trained, store)["saved"] == ["flan8_recipe/seed0/fedit"]
        assert (store / "flan8_recipe/seed0/fedit/results.md").read_text().endswith("rerun\n")
    finally:
        results.write_text(original_text)

    # the fresh checkout's report saves again: nothing stored changes (the restore's own mark is not written back);
    # a cell that came from a GPU archive keeps that mark, neither nested nor lost
    gpu_mark = {"archive": "quality_records.tar.gz", "device": "NVIDIA H200", "imported": "2026-11-30 01:27:48 UTC"}
    (store / "flan8_recipe/seed0/perfit" / grid.IMPORTED_FILE).write_text(json.dumps(gpu_mark))
    again = tmp_path / "again"
    qt.restore(store, again)
    assert json.loads((_cell(again, "perfit") / grid.IMPORTED_FILE).read_text())["first"] == gpu_mark
    stored = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert sorted(qt.save(again, store)["unchanged"]) == out["saved"]
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == stored

    # the report over the fresh checkout restores from the store and gives the same quality.json
    argv = ["report", "--tiny", "--setting", "flan8_recipe", "--no-write"]
    assert qs.main([*argv, "--root", str(trained), "--results", str(tmp_path / "a.json")]) == 0
    empty = tmp_path / "empty"
    assert qs.main([*argv, "--root", str(empty), "--store", str(store), "--results", str(tmp_path / "b.json")]) == 0
    assert "restored 2 finished cells" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads((tmp_path / "a.json").read_text())


def test_two_runs_restoring_at_once_keep_the_first_copy(trained, tmp_path, monkeypatch):
    """Two `run`s started together on a fresh checkout restore the same store: the one whose rename comes second
    finds the cell in place, keeps it, and leaves no temp folder (it used to fail with 'Directory not empty')."""
    store = tmp_path / "store"
    saved = sorted(qt.save(trained, store)["saved"])
    fresh = tmp_path / "fresh"
    real_replace, raced = os.replace, []

    def replace(src, dst):
        # (os.replace is the module's: the atomic file writes pass here too; only a cell's rename is raced)
        if not raced and Path(src).name.startswith(".import-"):
            raced.append(dst)  # the other process restores everything between our check and our first cell rename
            assert sorted(qt.restore(store, fresh)["imported"]) == saved
        return real_replace(src, dst)

    monkeypatch.setattr(qt.os, "replace", replace)
    out = qt.restore(store, fresh)
    assert len(raced) == 1
    # the raced cell is kept at the rename, the next one already at the check: the other process's copies stand
    assert str(Path(raced[0]).relative_to(fresh)) == saved[0]
    assert (out["imported"], sorted(out["kept_local"])) == ([], saved)
    assert not list(fresh.rglob(".import-*"))
    for method in ("fedit", "perfit"):
        assert qr.read_cell(_cell(fresh, method))["ppl"] == qr.read_cell(_cell(trained, method))["ppl"]

    # a temp folder a killed process left (before this fix, the crash above left one) is no cell: a save skips it
    orphan = fresh / "flan8_recipe" / "seed0" / ".import-orphan"
    qt._copy_records(_cell(fresh, "fedit"), orphan)
    assert [p.name for p in qt.cell_folders(fresh)] == ["fedit", "perfit"]
    assert sorted(qt.save(fresh, tmp_path / "store2")["saved"]) == saved


def test_run_in_a_fresh_checkout_trains_only_what_the_store_lacks(trained, tmp_path, capsys):
    store = tmp_path / "store"
    qt.save(trained, store)
    fresh = tmp_path / "fresh"
    argv = ["run", *COMMON, "--methods", "fedit", "perfit", "--root", str(fresh), "--store", str(store)]
    assert qs.main(argv) == 0
    out = capsys.readouterr().out
    assert "restored 2 finished cells" in out
    assert "cells: trained 0, reused 2, skipped 0, failed 0, refused 0" in out
    assert not list(fresh.rglob("*.safetensors"))  # nothing trained: records only
    for method in ("fedit", "perfit"):
        assert qr.read_cell(_cell(fresh, method))["ppl"] == qr.read_cell(_cell(trained, method))["ppl"]


def test_report_keeps_numbers_whose_records_are_elsewhere(trained, tmp_path):
    results = tmp_path / "q.json"
    lost = {"client_0": [4.0, 2.0], "client_1": [9.0, 8.0]}
    results.write_text(json.dumps({"flan8_recipe": {"local": {"7": lost}}}))
    argv = ["report", "--tiny", "--setting", "flan8_recipe", "--no-write", "--root", str(trained)]
    assert qs.main([*argv, "--results", str(results)]) == 0
    after = json.loads(results.read_text())
    assert after["flan8_recipe"]["local"]["7"] == lost  # kept though no records of it are here
    assert set(after["flan8_recipe"]["fedit"]) == {"0"}  # the cells that are here are written as before
    section = (trained / "benchmarks_section.md").read_text()
    # in the table, marked: geometric sqrt(2*8) = 4, arithmetic (2+8)/2 = 5; no FedIT seed 7 to pair with, no ROUGE-L
    assert "| local | 7† | 4.000 | – | 5.000 | – |" in section
    assert f"{qr.KEPT_MARK} {qr.KEPT_NOTE}" in section

    # a finished cell rebuilt from its quality.json entry alone gives the row its records give
    for method in ("fedit", "perfit"):
        cell = qr.read_cell(_cell(trained, method))
        kept = qr.kept_cell(after["flan8_recipe"][method]["0"])
        mine, theirs = qr.seed_stats(kept), qr.seed_stats(cell)
        assert mine["geo"] == pytest.approx(theirs["geo"], rel=1e-12)
        assert mine["arith"] == theirs["arith"] and "rouge" not in mine and mine["precision"] is None
        assert qr.round_curves(kept) == pytest.approx(qr.round_curves(cell), rel=1e-12)

    merged, kept = qr.merge_results(
        {"s": {"m": {"0": {"c": [1.0]}, "1": {"c": [2.0]}}}}, {"s": {"m": {"0": {"c": [3.0]}}}}
    )
    assert merged == {"s": {"m": {"0": {"c": [3.0]}, "1": {"c": [2.0]}}}}  # a cell that is here wins
    assert kept == {"s": {"m": {"1": {"c": [2.0]}}}}


def test_report_marks_cells_of_another_precision(trained, tmp_path):
    """A FedIT cell from the CPU beside a PerFIT cell from a GPU (bf16): the table says each seed's precision, pairs
    no seed across precisions for the ratio to FedIT, and calls the verdict provisional."""
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(trained, root)
    # both cells relabelled: `trained` ran where the suite runs, the CPU or (`device: auto`) a visible GPU
    for method, device in (("fedit", "cpu"), ("perfit", "cuda (NVIDIA H200)")):
        wall = _cell(root, method) / "wall_time.json"
        data = json.loads(wall.read_text())
        for session in data["sessions"]:
            session["device"] = device
        wall.write_text(json.dumps(data))
    argv = ["report", "--tiny", "--setting", "flan8_recipe", "--no-write"]
    assert qs.main([*argv, "--root", str(root), "--results", str(root / "q.json")]) == 0
    section = (root / "benchmarks_section.md").read_text()
    assert "**Mixed precision.**" in section and "(provisional: the rows mix bf16 and fp32 cells)" in section
    assert "| fedit | 0 fp32 |" in section
    row = next(line for line in section.splitlines() if line.startswith("| perfit | 0 bf16 |"))
    assert row.split(" | ")[3] == "–"  # no ratio to FedIT: no seed of one precision in both rows
    assert "over seeds of different precisions" in section
    # the same report over the unmixed cells says none of it
    assert qs.main([*argv, "--root", str(trained), "--results", str(tmp_path / "q.json")]) == 0
    assert "Mixed precision" not in (trained / "benchmarks_section.md").read_text()


def test_report_no_write_leaves_the_docs_plots_alone(trained, tmp_path):
    """`report --no-write` (no --tiny) over a root: quality.json, the records and the plot go where it is told or to
    the root; docs/quality_scale_*.png, which the docs' tables were built with, are not rewritten."""
    docs_png = grid.REPO_ROOT / "docs" / "quality_scale_flan8_recipe.png"
    before = docs_png.stat().st_mtime_ns if docs_png.is_file() else None
    argv = ["report", "--setting", "flan8_recipe", "--root", str(trained), "--no-write"]
    assert qs.main([*argv, "--results", str(tmp_path / "q.json"), "--store", str(tmp_path / "store")]) == 0
    assert (docs_png.stat().st_mtime_ns if docs_png.is_file() else None) == before
    assert (trained / "quality_scale_flan8_recipe.png").is_file()
    assert json.loads((tmp_path / "q.json").read_text())["flan8_recipe"]


def test_kept_cells_carry_what_an_earlier_report_built_from_their_records(tmp_path):
    """docs/results/kept_columns.json's columns: a row of one seed gives that cell's own ROUGE-L, bytes and wall time,
    a row of several seeds gives its columns where the row's seeds are exactly those, and a mask overlap row comes
    back per seed."""
    clients = {"client_0": [4.0, 2.0], "client_1": [9.0, 8.0]}
    overlap = {"round": 1, "clients": 2, "density": 0.25, "shared": 0.2, "exclusive": 0.1, "none": 0.7}
    extra = {
        "flan8_recipe": {
            "rows": {
                "fedprox": {"seeds": [0], "rouge": "0.517", "mb_up": "1,343.2", "mb_down": "0.000", "wall_min": "63"},
                "local": {
                    "seeds": [0, 1],
                    "rouge": "0.535 ± 0.017",
                    "mb_up": "147.5",
                    "mb_down": "0.000",
                    "wall_min": "95",
                },
            },
            "mask_overlap": {"fedprox": {"0": overlap}},
        }
    }
    known = qr.kept_columns(extra, "flan8_recipe", "fedprox", 0)
    assert known["rouge"] == 0.517 and known["bytes_up"] == pytest.approx(1343.2e6) and known["wall_s"] == 63 * 60
    cell = qr.kept_cell(clients, known)
    assert qr.seed_stats(cell)["rouge"] == 0.517 and qr.mask_overlap(cell) == overlap
    assert "rouge" not in qr.kept_columns(extra, "flan8_recipe", "local", 0)  # a mean over 2 seeds is no seed's

    setting = grid.SETTINGS["flan8_recipe"]
    local = {s: qr.kept_cell(clients, qr.kept_columns(extra, "flan8_recipe", "local", s)) for s in (0, 1)}
    lines = qr.render_setting(setting, {"local": local}, None, True, tmp_path)
    assert "| local | 0†, 1† | 4.000 ± 0.000 | – | 5.000 ± 0.000 | 0.535 ± 0.017 | – | 147.5 | 0.000 | 95 |" in lines
    lines = qr.render_setting(setting, {"local": {0: local[0]}}, None, True, tmp_path)  # not the row's seeds
    assert "| local | 0† | 4.000 | – | 5.000 | – | – | – | – | – |" in lines
