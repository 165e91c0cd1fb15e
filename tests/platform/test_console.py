"""The console keeps the platform's voice: its `[rsrefseg]` lines, warnings and errors. Libraries'
INFO chatter (Ray's above all) goes to the command's log file, and `--verbose` brings it back."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pytest

from rsrefseg.platform import console


@pytest.fixture
def routed(monkeypatch, tmp_path):
    """`console.setup` in a process whose logging nobody configured yet (as `rsrefseg` starts:
    pytest's own handlers are set aside), with a library logger that prints on its own, as Ray's
    and MLflow's do; all set back afterwards. The project folder is tmp_path."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.delenv("MLFLOW_CONFIGURE_LOGGING", raising=False)
    monkeypatch.setenv("RSREFSEG_HOME", str(tmp_path))
    chatty = logging.getLogger("thirdparty.chatty")
    monkeypatch.setattr(chatty, "handlers", [logging.StreamHandler(sys.stderr)])
    monkeypatch.setattr(chatty, "propagate", False)
    monkeypatch.setattr(console, "ADOPTED", (*console.ADOPTED, "thirdparty.chatty"))
    for name in console.ADOPTED:  # Ray's loggers as imported (or not) so far: adopted here, restored after
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(console, "QUIET", ())

    def setup(command: str, verbose: bool = False):
        monkeypatch.setattr(root, "handlers", [])  # pytest adds its handlers when a test starts
        return console.setup(command, verbose)

    yield setup
    console.close()


def test_say_writes_exactly_one_prefixed_line(capsys):
    console.say("epoch 1/3 step 2/9 loss 0.5")
    console.say("[rsrefseg] already prefixed")
    console.say("ends with a newline\n")
    out, err = capsys.readouterr()
    assert out == ("[rsrefseg] epoch 1/3 step 2/9 loss 0.5\n[rsrefseg] already prefixed\n"
                   "[rsrefseg] ends with a newline\n")
    assert err == ""


def test_library_info_goes_to_the_log_file_and_warnings_to_both(routed, capsys):
    path = routed("train")
    assert path.parent == Path(os.environ["RSREFSEG_HOME"]) / "logs" and path.name.startswith("train-") and path.suffix == ".log"
    logging.getLogger("ray.data.execution").info("Starting execution of Dataset train_0")
    logging.getLogger("thirdparty.chatty").info("Reporting training result 1: TrainingReport(...)")
    logging.getLogger("ray.data.execution").debug("scheduler loop")
    logging.getLogger("ray.train").warning("a worker is slow")
    logging.getLogger("rsrefseg.platform.ray_session").info("joining Ray at 10.0.0.1:6379")
    console.name_log()
    logging.getLogger("ray.data.execution").info("Execution plan of Dataset train_0")
    err = capsys.readouterr().err
    assert "Starting execution" not in err and "TrainingReport(" not in err
    assert "WARNING ray.train: a worker is slow" in err
    assert "INFO rsrefseg.platform.ray_session: joining Ray at 10.0.0.1:6379" in err  # the platform's own
    logged = path.read_text()
    for text in ("Starting execution of Dataset train_0", "TrainingReport(", "a worker is slow", "joining Ray",
                 "Execution plan of Dataset train_0"):
        assert text in logged
    assert "scheduler loop" not in logged  # INFO and up


def test_verbose_puts_library_info_back_on_the_console(routed, capsys):
    path = routed("evaluate", verbose=True)
    console.name_log()
    logging.getLogger("thirdparty.chatty").info("Checkpoint successfully created at: /x")
    logging.getLogger("ray.data").debug("scheduler loop")
    err = capsys.readouterr().err
    assert "Checkpoint successfully created at: /x" in err and "scheduler loop" not in err
    assert "Checkpoint successfully created" in path.read_text()


def test_forwarded_worker_lines_keep_the_platform_s_and_the_alarms(routed):
    path = routed("train", verbose=False)
    lines = [
        "[rsrefseg] epoch 1/1 step 2/9 loss 1.4558",
        "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1})",
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/runs/x)",
        "Starting execution of Dataset val_0. Full logs are in /tmp/ray/session/logs/ray-data",
        "\x1b[2mRunning Dataset train_0.: 0.00 row [00:00, ? row/s]\x1b[0m",
        "/venv/torch/distributed/c10d_logger.py:83: FutureWarning: `all_gather_into_tensor` is deprecated.",
        "[2026-12-06 03:47:19,129] [WARNING] [real_accelerator.py:213] Setting accelerator to CPU.",
    ]
    kept = console.worker_lines(lines, "RayTrainWorker pid=7")
    console.name_log()
    assert kept == [lines[0], lines[5], lines[6]]
    traceback = ["Exception in thread Monitor:", "Traceback (most recent call last):", '  File "x.py", line 1',
                 "    run()", "ConnectionError: no Ray"]
    assert console.worker_lines(traceback, "pid=8") == traceback
    logged = path.read_text()
    assert all(f"(RayTrainWorker pid=7) {line}" in logged for line in lines[:4])
    assert "Running Dataset train_0." in logged and "\x1b[" not in logged  # no colour codes in the file
    assert "(pid=8) Exception in thread Monitor:" in logged


def test_verbose_forwards_every_worker_line(routed):
    routed("train", verbose=True)
    lines = ["Reporting training result 1: TrainingReport(...)", "[rsrefseg] epoch 1/1 validation: gIoU 0.00"]
    assert console.worker_lines(lines, "pid=1") == lines


def test_only_a_command_that_names_its_log_writes_one_from_its_first_record(routed, capsys):
    path = routed("prepare", verbose=False)
    logging.getLogger("rsrefseg.datasets.prepare").info("prepared out: train 3")
    console.close()
    assert not path.parent.exists()  # prepare, submit, ...: no Ray, no log file
    path = routed("train", verbose=False)
    logging.getLogger("thirdparty.chatty").info("before Ray started")
    assert not path.exists()
    assert console.name_log() == path
    assert console.name_log() == path
    logging.getLogger("thirdparty.chatty").info("after")
    out = capsys.readouterr().out
    assert out.count("[rsrefseg] log: ") == 1 and str(path) in out
    logged = path.read_text()
    assert logged.index("before Ray started") < logged.index("after")


def test_a_host_that_configured_logging_keeps_it(tmp_path):
    root = logging.getLogger()
    theirs = list(root.handlers)
    assert theirs  # pytest's, here
    assert console.setup("train", verbose=False, log_dir=tmp_path) is None
    assert root.handlers == theirs and not console.active() and console.verbose()
    assert console.worker_lines(["Reporting training result 1"], "pid=1") == ["Reporting training result 1"]
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_project_keeps_the_log_in_the_temp_dir(routed, monkeypatch):
    monkeypatch.setattr(console, "_writable", lambda folder: "rsrefseg-logs" in str(folder))
    path = routed("train", verbose=False)
    assert path.parent.name == "rsrefseg-logs"


def test_every_subcommand_takes_verbose():
    from rsrefseg.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        assert any("--verbose" in action.option_strings for action in sub._actions), name
    args = parser.parse_args(["train", "--config", "configs/demo.yaml", "train.epochs=1", "--verbose"])
    assert args.verbose and args.overrides == ["train.epochs=1"]
    assert not parser.parse_args(["train", "--config", "configs/demo.yaml"]).verbose
