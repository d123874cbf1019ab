"""Runs under hostile conditions: settings that make no sense, edited and damaged journals, two
processes on one run, and signals (Ctrl-C at any moment, SIGTERM, SIGKILL) with worker processes
in flight. Every case is one line and a non-zero exit, or handled, and no process is orphaned."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from conftest import write_sphere_store
from faults import (
    alive,
    descendants,
    one_error_line,
    run_naslung,
    signal_group,
    start,
    temporary_leftovers,
    wait_for,
)

from naslung.cli import main, search_main
from naslung.locking import lock_run_dir, lock_store

SEARCH = ["--widths", "4,8", "--min-depth", "3", "--max-depth", "3", "--epochs", "1",
          "--max-candidates", "2", "--device", "cpu", "--no-progress"]


# --- settings --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_fold_store(tmp_path_factory):
    return write_sphere_store(tmp_path_factory.mktemp("one-fold") / "store", n=8, side=8, n_folds=1)


def settings_cases(store: str, one_fold: str) -> dict[str, tuple[list[str], str]]:
    search = ["search", "--data-dir", store, "--out", "{tmp}/run", *SEARCH]
    return {
        "test fold past the last": ([*search, "--test-fold", "5"], "--test-fold 5: fold 5 is out of range"),
        "test fold 99": ([*search, "--test-fold", "99"], "--test-fold 99: fold 99 is out of range"),
        "negative test fold": ([*search, "--test-fold", "-1"], "--test-fold: must be at least 0"),
        "one-fold store": (["search", "--data-dir", one_fold, "--out", "{tmp}/run", *SEARCH],
                           "cross-validation needs >= 2 folds"),
        "time budget nan": ([*search, "--time-budget", "nan"], "--time-budget: expected a finite number"),
        "negative time budget": ([*search, "--time-budget", "-5"], "--time-budget: must be greater than 0"),
        "zero patience": ([*search, "--patience", "0"], "--patience: must be at least 1"),
        "lr nan": (["train", "--data-dir", store, "--lr", "nan"], "--lr: expected a finite number"),
        "zero crop": (["train", "--data-dir", store, "--crop", "0"], "--crop: must be at least 1"),
        "zero epochs": (["train", "--data-dir", store, "--epochs", "0"], "--epochs: must be at least 1"),
        "zero batch": (["train", "--data-dir", store, "--batch-size", "0"], "--batch-size: must be at"),
        "ensemble top 0": (["ensemble", "--run", "{tmp}", "--top", "0"], "--top: must be at least 1"),
        "ensemble epochs 0": (["ensemble", "--run", "{tmp}", "--epochs", "0"], "--epochs: must be at"),
        "min diameter nan": (["prepare", "phantom", "--min-diameter", "nan"], "--min-diameter: expected"),
        "one fold": (["prepare", "phantom", "--folds", "1"], "--folds: must be at least 2"),
        "limit 0": (["prepare", "phantom", "--limit", "0"], "--limit: must be at least 1"),
        "negative sample": (["latency", "--sample", "-1"], "--sample: must be at least 0"),
        "workers 0": (["prepare", "lidc", "--root", "x", "--workers", "0"], "--workers: must be at least 1"),
    }


CASES = list(settings_cases("", ""))


@pytest.mark.parametrize("case", CASES)
def test_settings_that_make_no_sense_are_refused_before_work(tmp_path, sphere_store, one_fold_store,
                                                             capsys, case):
    argv, message = settings_cases(str(sphere_store.root), str(one_fold_store.root))[case]
    started = time.monotonic()
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert time.monotonic() - started < 30  # refused up front, not after trying candidates
    assert not (tmp_path / "run" / "journal.jsonl").exists()


def test_a_search_whose_candidates_all_fail_gives_up_with_an_empty_front(sphere_store, tmp_path):
    from naslung.search.driver import FAILURES_BEFORE_GIVING_UP, SearchConfig, run_search
    from naslung.search.executors import InProcessExecutor
    from naslung.search.trial import TrialData

    data = TrialData.of(sphere_store)
    broken = TrialData(data.crops, data.labels + 2, data.folds, data.n_folds, data.fingerprint)
    cfg = SearchConfig(widths=(4, 8, 16), min_depth=3, max_depth=4, epochs=1)
    result = run_search(sphere_store, cfg, tmp_path / "run", torch.device("cpu"), show_progress=False,
                        executor=InProcessExecutor(broken, torch.device("cpu")))
    assert result.front == [] and result.trained == 0
    gave_up = f"gave up: the first {FAILURES_BEFORE_GIVING_UP} candidates all failed"
    assert result.stop_reason.startswith(gave_up)
    assert len(result.records) == FAILURES_BEFORE_GIVING_UP


# --- journals ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_search(sphere_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("search") / "run"
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(run), *SEARCH]) == 0
    return run


def edit_line(number: int, change):
    """An edit of journal line ``number`` (0 = the header): ``change(record)`` returns the new
    record, or a string to write instead of it."""
    def edit(lines: list[str]) -> list[str]:
        record = json.loads(lines[number])
        new = change(record)
        lines[number] = new if isinstance(new, str) else json.dumps(new)
        return lines
    return edit


def without(key):
    return lambda record: {k: v for k, v in record.items() if k != key}


def setting(key, value):
    return lambda record: {**record, key: value}


JOURNAL_EDITS = {
    "arch edited": (edit_line(1, lambda r: {**r, "arch": "8/8/8" if r["arch"] != "8/8/8" else "4/4/4"}),
                    "arch is"),
    "params edited": (edit_line(1, lambda r: {**r, "params": r["params"] + 1}), "params is"),
    "flops edited": (edit_line(1, lambda r: {**r, "flops": r["flops"] * 2}), "flops is"),
    "cost edited": (edit_line(1, lambda r: {**r, "cost": r["cost"] / 2}), "cost"),
    "no status": (edit_line(1, without("status")), "a candidate line without 'status'"),
    "unknown status": (edit_line(1, setting("status", "maybe")), "neither 'ok' nor 'failed'"),
    "score out of range": (edit_line(1, setting("score", 1.5)), "must be a number in 0..1"),
    "score a string": (edit_line(1, setting("score", "0.9")), "must be a number in 0..1"),
    "index a bool": (edit_line(1, setting("index", True)), "is not of the expected type"),
    "negative index": (edit_line(1, setting("index", -3)), "negative"),
    "index past the space": (edit_line(1, setting("index", 10**6)), "index beyond this search space"),
    "header without config": (edit_line(0, without("config")), "a header line without 'config'"),
    "not an object": (edit_line(1, lambda r: "[1, 2, 3]"), "must be a JSON object"),
    "not JSON mid-file": (edit_line(1, lambda r: "{oops"), "is not JSON"),
    "unknown type": (edit_line(1, setting("type", "note")), "unknown line type 'note'"),
    "second header": (lambda lines: [lines[0], *lines], "a second header"),
    "header not first": (lambda lines: [lines[1], lines[0], *lines[2:]], "the first line must be the header"),
    "zero slots": (lambda lines: [*lines, '{"type": "slots", "slots": 0}'], "must be a whole number >= 1"),
}


@pytest.mark.parametrize("edit", JOURNAL_EDITS)
def test_an_edited_or_damaged_journal_is_refused_on_resume(finished_search, sphere_store, tmp_path, capsys,
                                                           edit):
    run = shutil.copytree(finished_search, tmp_path / "run")
    journal = run / "journal.jsonl"
    change, message = JOURNAL_EDITS[edit]
    journal.write_text("\n".join(change(journal.read_text().splitlines())) + "\n")
    before = journal.read_bytes()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(run), "--resume", *SEARCH]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert journal.read_bytes() == before  # nothing appended, nothing deleted
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


def test_an_untouched_journal_resumes(finished_search, sphere_store, tmp_path):
    run = shutil.copytree(finished_search, tmp_path / "run")
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(run), "--resume", *SEARCH]) == 0

    def front(run):
        pareto = json.loads((run / "pareto.json").read_text())
        return [(f["arch"], f[pareto["metric"]]) for f in pareto["front"]]

    assert front(run) == front(finished_search)


# --- two processes, one run ------------------------------------------------------------------------


def test_a_second_search_on_a_run_in_use_is_refused_naming_the_holder(finished_search, sphere_store,
                                                                      tmp_path):
    run = shutil.copytree(finished_search, tmp_path / "run")
    before = (run / "journal.jsonl").read_bytes()
    with lock_run_dir(run, "search run"):  # this process stands for the first search
        proc = run_naslung("search", "--data-dir", sphere_store.root, "--out", run, "--resume", *SEARCH)
    assert proc.returncode == 2
    assert f"search run {run} is in use by process {os.getpid()}" in one_error_line(proc.stderr)
    assert (run / "journal.jsonl").read_bytes() == before


def test_a_store_being_built_is_not_built_twice(tmp_path):
    from test_nodulemnist import medmnist_arrays, write_npz

    npz = write_npz(tmp_path / "n.npz", medmnist_arrays())
    with lock_store(tmp_path / "store"):
        proc = run_naslung("prepare", "nodulemnist3d", "--npz", npz, "--data-dir", tmp_path / "store")
    assert proc.returncode == 2
    holder = f"crop store {tmp_path / 'store'} is in use by process {os.getpid()}"
    assert holder in one_error_line(proc.stderr)
    assert not (tmp_path / "store").exists()


# --- signals -------------------------------------------------------------------------------------


PHANTOM = ["prepare", "phantom", "--limit", "60", "--workers", "2", "--no-progress"]


def started_workers(process, count: int = 2, timeout: float = 120) -> list[int]:
    """The pids of ``process``'s worker processes once ``count`` of them are running tasks."""
    def workers() -> list[int]:
        return [pid for pid in descendants(process.pid)
                if "multiprocessing" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)]
    assert wait_for(lambda: len(workers()) >= count or process.poll() is not None, timeout)
    assert process.poll() is None, process.communicate()
    return workers()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("signum, status, line", [
    (signal.SIGTERM, 143, "naslung: terminated"),
    (signal.SIGINT, 130, "naslung: interrupted"),
])
def test_a_stopped_build_ends_with_one_line_and_takes_its_workers_along(tmp_path, signum, status, line):
    data_dir = tmp_path / "cache" / "store"
    process = start([*PHANTOM, "--data-dir", data_dir])
    workers = started_workers(process)
    time.sleep(1.0)  # the workers are rendering
    if signum == signal.SIGINT:
        signal_group(process, signum)  # as Ctrl-C at a terminal: the whole process group
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status and stderr.strip() == line
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10)
    assert not data_dir.exists() and temporary_leftovers(tmp_path) == []


def test_workers_die_with_a_killed_parent(tmp_path):
    process = start([*PHANTOM, "--data-dir", tmp_path / "store"])
    everything = [*started_workers(process), *descendants(process.pid)]
    process.kill()
    process.wait()
    assert wait_for(lambda: not any(alive(pid) for pid in everything), 10), \
        [_cmdline(pid) for pid in everything if alive(pid)]


def test_ctrl_c_during_worker_start_up_is_quiet(tmp_path):
    process = start([*PHANTOM, "--data-dir", tmp_path / "store"])
    assert wait_for(lambda: len(descendants(process.pid)) >= 2 or process.poll() is not None, 120)
    signal_group(process, signal.SIGINT)  # the workers are still importing
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == "naslung: interrupted", stderr


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8, 1.5, 3.0])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(tmp_path, delay):
    """Whether it lands in Python's start-up, an import of a C extension (held back until the
    import is over) or the work itself: status 130, one line, nothing written."""
    process = start(["prepare", "phantom", "--limit", "200", "--workers", "1", "--no-progress",
                     "--data-dir", tmp_path / "store"])
    time.sleep(delay)
    signal_group(process, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == "naslung: interrupted", stderr
    assert not (tmp_path / "store").exists() and temporary_leftovers(tmp_path) == []
