"""The `naslung` command line: output, run directories, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from naslung.cli import main


def test_arch_prints_params_flops_and_layers(capsys):
    assert main(["arch", "64,64,64/128,128,256/256,256,256,512"]) == 0
    out = capsys.readouterr().out
    assert "28,456,204 parameters" in out
    assert "stages.2.blocks.3.shortcut" in out and "GFLOPs" in out


@pytest.mark.parametrize("argv, message", [
    (["arch", "4,8/16"], "2 stage(s)"),
    (["train", "--arch", "4,x/8/8"], "'x'"),
    (["train", "--device", "tpu"], "unknown device"),
    (["train", "--preset", "huge"], "invalid choice"),
    (["train", "--epochs", "many"], "expected a whole number"),
    (["eval", "nowhere"], "needs --data-dir"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_missing_store_and_bad_fold(tmp_path, sphere_store, capsys):
    assert main(["train", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no crop store" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(sphere_store.root), "--folds", "9"]) == 2
    assert "fold 9 is out of range" in capsys.readouterr().err


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "naslung.cli", "train", "--data-dir",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("naslung: error: no crop store")
    assert "Traceback" not in proc.stderr


def test_train_then_eval(sphere_store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(sphere_store.root), "--arch", "4/4/8", "--epochs", "1",
                 "--folds", "0,1", "--loss", "ce", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fold 0:" in printed and "fold 1:" in printed and "mean" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["head"] == "linear" and config["store_sha256"] == sphere_store.fingerprint
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "own test fold" in printed.out and "warning" not in printed.err
    assert main(["eval", str(out / "fold0"), "--data-dir", str(sphere_store.root), "--fold", "all"]) == 0
    assert "trained and selected on" in capsys.readouterr().err
    assert main(["eval", str(out), "--fold", "0,1"]) == 2
    assert "one fold index" in capsys.readouterr().err


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("arch", "prepare", "train", "eval"):
        assert command in out
