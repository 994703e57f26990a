"""The CLI dispatcher: help lists commands; user errors exit 2 with one line and no traceback."""

from __future__ import annotations

import subprocess
import sys

from tfseg.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_console_help_runs_as_module(project_root):
    res = subprocess.run([sys.executable, "-m", "tfseg", "--help"], capture_output=True, text=True,
                         cwd=project_root, timeout=120)
    assert res.returncode == 0
    assert "tfrecords" in res.stdout and "predict" in res.stdout


def test_unknown_command_exits_2_one_line(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exit_:
        assert exit_.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert err.count("\n") == 1


def test_bad_config_key_exits_2_without_traceback(tmp_path, project_root):
    res = subprocess.run([sys.executable, "-m", "tfseg", "tfrecords", "--config", "params.yaml",
                          "--set", "data.sorce=folder"], capture_output=True, text=True, cwd=project_root,
                         timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "unknown key 'data.sorce' (did you mean 'data.source'?)" in res.stderr
    assert res.stderr.strip().count("\n") == 0
