"""The search driver and its CLI: outputs, journal, resume after SIGKILL, clear errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from naslung.cli import search_main
from naslung.search.journal import Journal
from naslung.train.formats import cpu_supports_bf16

SMALL = ["--widths", "4,8", "--min-depth", "3", "--max-depth", "4", "--epochs", "1",
         "--max-candidates", "4", "--device", "cpu", "--no-progress"]


def candidates(run):
    return [r for r in Journal(run / "journal.jsonl").read() if r["type"] == "candidate"]


def test_search_writes_front_plot_journal_and_checkpoints(sphere_store, tmp_path):
    run = tmp_path / "run"
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL]) == 0
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["trained"] == 4 and pareto["stop_reason"] == "candidate budget"
    assert pareto["held_out_test_fold"] == 0 and pareto["front"]
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = candidates(run)
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert {"arch", "score", "cost", "params", "flops", "seed", "seconds", "versions"} <= set(records[0])
    for member in pareto["front"]:
        assert (run / "checkpoints").is_dir() and member["checkpoint"]
    assert len(list((run / "checkpoints").iterdir())) == len(pareto["front"])


def test_a_killed_search_resumes_to_the_same_result(sphere_store, tmp_path):
    args = ["--data-dir", str(sphere_store.root), *SMALL, "--epochs", "2"]
    reference = tmp_path / "reference"
    assert search_main([*args, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    code = "import sys; from naslung.cli import search_main; sys.exit(search_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(candidates(killed)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = candidates(killed)
    assert 2 <= len(finished_before) < 4, "the kill should land mid-search"

    assert search_main([*args, "--out", str(killed), "--resume"]) == 0
    after = candidates(killed)
    assert after[:len(finished_before)] == finished_before, "finished candidates are not retrained"
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in after]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in candidates(reference)]
    def front(run):
        pareto = json.loads((run / "pareto.json").read_text())
        return [(f["arch"], f[pareto["metric"]], f["cost"]) for f in pareto["front"]]

    assert front(killed) == front(reference)


def test_torn_last_line_is_ignored(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append({"type": "header", "config": {}, "store_sha256": "", "store": ""})
    candidate = {"type": "candidate", "arch": "4/4/4", "seed": 0, "params": 1, "flops": 1, "cost": 1.0,
                 "status": "failed"}
    journal.append({**candidate, "index": 1})
    with open(journal.path, "a") as f:
        f.write('{"type": "candidate", "ind')
    assert [r["type"] for r in journal.read()] == ["header", "candidate"]
    journal.drop_torn_tail()
    journal.append({**candidate, "index": 2})
    assert [r.get("index") for r in journal.read()] == [None, 1, 2]


@pytest.mark.parametrize("extra, message", [
    (["--widths", "4,x"], "--widths"),
    (["--objective", "latency-ms"], "invalid choice"),
    (["--max-candidates", "0"], "--max-candidates: must be at least 1"),
])
def test_bad_search_arguments_exit_2(sphere_store, tmp_path, extra, message, capsys):
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_existing_journal_needs_resume_and_the_same_settings(sphere_store, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL, "--max-candidates", "1"]
    assert search_main(args) == 0
    assert search_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert search_main([*args, "--resume", "--epochs", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_search_trains_in_the_precision_asked_for_and_journals_it(sphere_store, tmp_path):
    run = tmp_path / "run"
    args = ["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL, "--max-candidates", "2"]
    assert search_main([*args, "--precision", "bf16"]) == 0
    assert [r["precision"] for r in candidates(run)] == ["bf16", "bf16"]
    meta = json.loads(next((run / "checkpoints").glob("*/model.json")).read_text())
    assert meta["train_config"]["precision"] == "bf16"
    assert meta["train_config"]["schedule"] == "constant"  # the original's search budget


def test_a_journal_older_than_the_precision_setting_resumes_as_fp32(sphere_store, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL, "--max-candidates", "1"]
    assert search_main([*args, "--precision", "fp32"]) == 0
    journal = run / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["config"]["precision"]  # as written before --precision existed
    journal.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    assert search_main([*args, "--max-candidates", "2", "--resume", "--precision", "fp32"]) == 2
    assert "other settings" in capsys.readouterr().err  # max-candidates differs: still checked
    assert search_main([*args, "--resume", "--precision", "bf16"]) == 2
    assert search_main([*args, "--resume", "--precision", "fp32"]) == 0


def front_of(run):
    pareto = json.loads((run / "pareto.json").read_text())
    return [(f["arch"], f[pareto["metric"]], f["cost"]) for f in pareto["front"]]


def test_process_pool_trains_candidates_in_parallel_reproducibly(sphere_store, tmp_path):
    args = ["--data-dir", str(sphere_store.root), *SMALL, "--workers", "2"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert search_main([*args, "--out", str(first)]) == 0
    assert search_main([*args, "--out", str(second)]) == 0
    header = Journal(first / "journal.jsonl").read()[0]
    assert header["slots"] == 2
    records = candidates(first)
    assert len(records) == 4 and all(r["status"] == "ok" and r["device"] == "cpu" for r in records)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in candidates(second)]
    assert front_of(first) == front_of(second) and front_of(first)
    assert len(list((first / "checkpoints").iterdir())) == len(front_of(first))


def test_resuming_with_more_slots_is_journalled_and_replays(sphere_store, tmp_path):
    run = tmp_path / "run"
    args = ["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL]
    assert search_main(args) == 0
    journal = run / "journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:2]))  # killed after one
    assert search_main([*args, "--resume", "--workers", "2"]) == 0
    entries = Journal(run / "journal.jsonl").read()
    assert [e["type"] for e in entries[:3]] == ["header", "candidate", "slots"]
    assert entries[2]["slots"] == 2 and len(candidates(run)) == 4
    front = front_of(run)
    assert search_main([*args, "--resume"]) == 0  # replays the slot change, trains nothing
    assert len(candidates(run)) == 4 and front_of(run) == front


@pytest.mark.slow
def test_ray_local_runtime_runs_the_search(sphere_store, tmp_path):
    run = tmp_path / "ray"
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL,
                        "--executor", "ray", "--cpus-per-trial", "1"]) == 0
    header, *_ = Journal(run / "journal.jsonl").read()
    records = candidates(run)
    assert header["slots"] >= 1 and len(records) == 4
    assert all(r["status"] == "ok" and r["device"] == "cpu" for r in records)
    assert front_of(run) and (run / "pareto.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--executor", "ray", "--workers", "2"], "does not apply to --executor ray"),
    (["--gpus-per-trial", "0.5"], "need --executor ray"),
    (["--executor", "ray", "--gpus-per-trial", "0.5"], "GPU(s)"),
])
def test_bad_executor_arguments_exit_2(sphere_store, tmp_path, extra, message, capsys):
    if "--gpus-per-trial" in extra and "ray" in extra and torch.cuda.is_available():
        pytest.skip("this machine's Ray runtime has a GPU")
    assert search_main(["--data-dir", str(sphere_store.root), "--out", str(tmp_path / "r"), *SMALL,
                        *extra]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("naslung")]
    assert len(ours) == 1 and message in ours[0]  # Ray may print its own banner before it


def test_latency_objective_ranks_by_the_table_kept_in_the_run(sphere_store, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NASLUNG_CACHE", str(cache))
    run = tmp_path / "run"
    args = ["--data-dir", str(sphere_store.root), "--out", str(run), *SMALL, "--objective", "latency"]
    assert search_main(args) == 0
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["objective"] == "latency" and (run / "latency.json").is_file()
    records = candidates(run)
    assert all(0 < r["cost"] < 10_000 for r in records)  # milliseconds of a batch-1 forward pass
    cached_tables = list(cache.glob("latency/*.json"))
    assert cached_tables
    for cached in cached_tables:  # the machine's cache changes (re-measured)...
        table = json.loads(cached.read_text())
        table["blocks"] = {k: v * 2 for k, v in table["blocks"].items()}
        cached.write_text(json.dumps(table))
    journal = run / "journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:3]))
    assert search_main([*args, "--resume"]) == 0  # ...a resumed search ranks by the run's own table
    resumed = candidates(run)
    assert [(r["arch"], r["cost"]) for r in resumed] == [(r["arch"], r["cost"]) for r in records]


def test_a_trial_that_fails_twice_is_journalled_as_failed(sphere_store, tmp_path):
    from naslung.search.driver import SearchConfig, run_search
    from naslung.search.executors import InProcessExecutor
    from naslung.search.trial import TrialData

    data = TrialData.of(sphere_store)
    broken = TrialData(data.crops, data.labels + 2, data.folds, data.n_folds, data.fingerprint)  # 2 classes
    cfg = SearchConfig(widths=(4, 8), min_depth=3, max_depth=4, epochs=1, max_candidates=3)
    result = run_search(sphere_store, cfg, tmp_path / "run", torch.device("cpu"), show_progress=False,
                        executor=InProcessExecutor(broken, torch.device("cpu")))
    records = candidates(tmp_path / "run")
    assert [r["status"] for r in records] == ["failed"] * 3 and all(r["error"] for r in records)
    assert result.front == [] and result.stop_reason == "candidate budget"
    assert (tmp_path / "run" / "pareto.png").is_file()


def test_a_killed_worker_process_is_retried_in_a_fresh_pool(sphere_store, tmp_path):
    import os
    import threading

    from naslung.search.driver import SearchConfig, run_search
    from naslung.search.executors import ProcessPoolTrialExecutor

    executor = ProcessPoolTrialExecutor(sphere_store, torch.device("cpu"), 2)
    killed = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(executor.pool._processes or {}) < 2:
            time.sleep(0.05)
        time.sleep(2.0)  # the workers have started their first trials
        pid = next(iter(executor.pool._processes))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    threading.Thread(target=kill_a_worker, daemon=True).start()
    cfg = SearchConfig(widths=(4, 8), min_depth=3, max_depth=4, epochs=1, max_candidates=4)
    run_search(sphere_store, cfg, tmp_path / "run", torch.device("cpu"), show_progress=False,
               executor=executor)
    assert killed
    records = candidates(tmp_path / "run")
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
