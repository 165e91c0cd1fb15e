"""Credentials in a URI are refused before anything records them, and no message echoes them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rsrefseg.cli import main
from rsrefseg.platform import paths, runs, storage
from rsrefseg.platform.config import load_config
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo.yaml")
SECRET = "s3cret"


def test_train_with_a_password_in_the_tracking_uri_fails_in_one_line_without_it(capsys, monkeypatch):
    from rsrefseg.jobs import session

    monkeypatch.setattr(session, "start_ray", lambda *a, **k: pytest.fail("a Ray resource was taken"))
    rc = main(["train", "--config", DEMO, f"tracking.uri=http://bob:{SECRET}@127.0.0.1:5000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert SECRET not in err and "bob" not in err
    assert "tracking.uri" in err and "MLFLOW_TRACKING_USERNAME" in err and "MLFLOW_TRACKING_PASSWORD" in err


@pytest.mark.parametrize("key, value", [
    ("tracking.uri", f"https://bob:{SECRET}@mlflow.example.com"),
    ("tracking.uri", "http://bob@127.0.0.1:5000"),
    ("tracking.artifact_location", f"s3://AKIA:{SECRET}@bucket/artifacts"),
    ("train.storage_path", f"s3://AKIA:{SECRET}@bucket/runs"),
    ("data.path", f"s3://AKIA:{SECRET}@bucket/data"),
    ("model.sam_checkpoint", f"s3://AKIA:{SECRET}@bucket/sam.pth"),
    ("model.siglip_path", f"s3://AKIA:{SECRET}@bucket/siglip"),
    ("cluster.address", f"ray://bob:{SECRET}@head:10001"),
    ("cluster.address", f"bob:{SECRET}@head:6379"),  # a Ray address without a scheme is a host too
])
def test_every_uri_valued_key_refuses_a_login_naming_the_key_not_the_secret(key, value):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"{key}={value}"])
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "user:password@" in message
    assert SECRET not in message and "bob" not in message and "AKIA" not in message


def test_uris_without_a_login_still_load():
    cfg = load_config(DEMO, ["tracking.uri=http://127.0.0.1:5000", "train.storage_path=s3://bucket/team@x/runs"])
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.train.storage_path == "s3://bucket/team@x/runs"  # an @ in the key is not a login


@pytest.mark.parametrize("address", [f"ray://bob:{SECRET}@head:10001", f"bob:{SECRET}@head:6379"])
def test_prepare_refuses_a_ray_address_with_a_login_without_echoing_it(address, tmp_path, capsys):
    rc = main(["prepare", "--format", "synthetic", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
               "--ray-address", address])
    err = capsys.readouterr().err
    assert rc == 2 and "--ray-address" in err and "user:password@" in err and "Traceback" not in err
    assert SECRET not in err and "bob" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri, shown", [
    (f"s3://AKIA:{SECRET}@bucket/runs", "s3://***@bucket/runs"),
    ("http://bob@host:5000/x", "http://***@host:5000/x"),
    (f"s3://bucket/runs?access_key=AKIA&secret_key={SECRET}", "s3://bucket/runs?access_key=***&secret_key=***"),
    ("s3://bucket/runs", "s3://bucket/runs"),
    ("runs/local@folder", "runs/local@folder"),
])
def test_redact(uri, shown):
    assert paths.redact(uri) == shown


@pytest.mark.parametrize("uri", [
    f"s3://AKIA:{SECRET}@bucket/runs",
    f"s3://bucket/runs?access_key=AKIA&secret_key={SECRET}",
])
def test_a_refused_storage_uri_is_not_echoed(uri):
    for check in (lambda: storage.check_uri("train.storage_path", uri), lambda: storage.location(uri)):
        with pytest.raises(storage.StorageError) as err:
            check()
        assert SECRET not in str(err.value) and "AKIA" not in str(err.value)
        assert "AWS_ACCESS_KEY_ID" in str(err.value)


def test_no_credentials_found_message_does_not_echo_a_login(monkeypatch):
    monkeypatch.setattr(storage, "has_credentials", lambda: False)
    uri = f"s3://AKIA:{SECRET}@bucket/runs"
    for check in (lambda: storage.check_writable("--resume", uri),
                  lambda: storage.check_readable("data.path", uri, "manifest.json")):
        with pytest.raises(storage.StorageError) as err:
            check()
        assert SECRET not in str(err.value) and "AKIA" not in str(err.value)


def test_resume_of_a_uri_with_a_login_is_not_echoed(tmp_path, capsys):
    rc = main(["train", "--resume", f"s3://AKIA:{SECRET}@bucket/runs/r"])
    err = capsys.readouterr().err
    assert rc == 2 and SECRET not in err and "AKIA" not in err and "Traceback" not in err
    with pytest.raises(ConfigError) as caught:
        runs.open_run(tmp_path, f"s3://AKIA:{SECRET}@bucket/runs/r")
    assert SECRET not in str(caught.value)


def test_submit_refuses_a_job_whose_command_line_holds_a_login():
    from rsrefseg.jobs.submit import entrypoint

    with pytest.raises(ConfigError) as err:
        entrypoint(["--", "train", "--config", "demo", f"tracking.uri=http://bob:{SECRET}@10.0.0.5:5000"])
    assert SECRET not in str(err.value) and "MLFLOW_TRACKING_USERNAME" in str(err.value)
    assert entrypoint(["--", "train", "tracking.uri=http://10.0.0.5:5000"]).endswith("tracking.uri=http://10.0.0.5:5000")


# -- rsrefseg submit: Ray's token over plain http ------------------------------------------------


@pytest.fixture
def fake_jobs_client(monkeypatch):
    import ray.job_submission

    seen = {}

    class FakeClient:
        def __init__(self, address, headers=None):
            seen.update(address=address, headers=headers)

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-" + SECRET)
    return seen


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("rsrefseg")]


def test_a_token_sent_over_plain_http_to_another_host_is_warned_about(fake_jobs_client, caplog):
    from rsrefseg.jobs import submit

    with caplog.at_level(logging.WARNING):
        submit._client("http://203.0.113.7:8265")
    warned = _warnings(caplog)
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "203.0.113.7" in warned[0] and "plain http" in warned[0] and "ssh -L" in warned[0]
    assert SECRET not in warned[0]
    assert fake_jobs_client["headers"] == {"Authorization": f"Bearer tok-{SECRET}"}  # still sent: a warning


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "http://127.8.0.3:8265", "http://localhost:8265",
                                     "http://[::1]:8265", "127.0.0.1:8265", "https://head.example.com:8265"])
def test_no_warning_over_loopback_or_https(address, fake_jobs_client, caplog):
    from rsrefseg.jobs import submit

    with caplog.at_level(logging.WARNING):
        submit._client(address)
    assert _warnings(caplog) == []


def test_no_warning_without_a_token(fake_jobs_client, caplog, monkeypatch, tmp_path):
    from rsrefseg.jobs import submit

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        submit._client("http://203.0.113.7:8265")
    assert _warnings(caplog) == [] and fake_jobs_client["headers"] is None
