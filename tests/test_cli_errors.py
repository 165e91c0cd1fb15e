"""Every error a user can meet on the command line is one line on stderr and exit 2, never a
traceback: a full disk, a refused permission, a name already taken, a port out of range."""

from __future__ import annotations

import errno
import os

import pytest

from rsrefseg import cli


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_full_disk_while_writing_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import tifffile

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(tifffile, "imwrite", full)
    assert cli.main(["demo-data", "--out", str(tmp_path / "raw"), "--size", "4"]) == 2
    line = _one_line(capsys)
    assert line.startswith("rsrefseg demo-data: error: ")
    assert os.strerror(errno.ENOSPC) in line and ".tif" in line


def test_a_refused_permission_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from rsrefseg.jobs import prepare

    where = str(tmp_path / "out" / "train")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), where)

    monkeypatch.setattr(prepare, "run_prepare", refused)
    assert cli.main(["prepare", "--format", "synthetic", "--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    line = _one_line(capsys)
    assert line == f"rsrefseg prepare: error: {where}: {os.strerror(errno.EACCES)}"


def test_a_folder_named_like_an_existing_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert cli.main(["demo-data", "--out", str(tmp_path / "taken" / "raw"), "--size", "4"]) == 2
    line = _one_line(capsys)
    assert "taken" in line and (os.strerror(errno.EEXIST) in line or os.strerror(errno.ENOTDIR) in line)


def test_an_os_error_without_a_file_is_still_one_line(monkeypatch, capsys):
    from rsrefseg.jobs import prepare

    def store_says(*args, **kwargs):
        raise OSError("AWS Error ACCESS_DENIED during PutObject operation:\n  Access Denied")

    monkeypatch.setattr(prepare, "run_prepare", store_says)
    assert cli.main(["prepare", "--format", "synthetic", "--root", "r", "--out", "o"]) == 2
    assert "ACCESS_DENIED" in _one_line(capsys)


@pytest.mark.parametrize("command", ["ui", "mlflow-server"])
@pytest.mark.parametrize("value", ["70000", "0", "-1", "http"])
def test_an_out_of_range_port_is_a_usage_error(command, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--port", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--port" in err and "1-65535" in err


def test_a_port_in_range_is_taken():
    args = cli.build_parser().parse_args(["ui", "--port", "8080"])
    assert args.port == 8080
    assert cli.build_parser().parse_args(["mlflow-server"]).port == 5000
