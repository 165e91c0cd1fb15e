"""S3 requests are retried: a job's own requests up to RETRY_ATTEMPTS times, the checks before a
job (a probe write, a manifest read) only PREFLIGHT_ATTEMPTS times, so a wrong endpoint is
refused in a second or two rather than after the whole backoff."""

from __future__ import annotations

import socket
import threading

import pytest

from rsrefseg.platform import storage


class DroppingEndpoint:
    """A TCP listener on loopback that accepts each connection and drops it at once (a retryable
    network error to an S3 client), counting the connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def dropping(monkeypatch):
    endpoint = DroppingEndpoint()
    for key in storage.ENDPOINT_ENVS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield endpoint
    endpoint.sock.close()


def test_a_preflight_check_tries_a_dropped_request_twice_then_names_the_endpoint(dropping):
    with pytest.raises(storage.StorageError, match="train.storage_path") as err:
        storage.check_writable("train.storage_path", "s3://bucket/runs")
    assert "NETWORK_CONNECTION" in str(err.value)
    assert dropping.connections == storage.PREFLIGHT_ATTEMPTS

    dropping.connections = 0
    with pytest.raises(storage.StorageError, match="data.path"):
        storage.check_readable("data.path", "s3://bucket/data", "manifest.json")
    assert dropping.connections == storage.PREFLIGHT_ATTEMPTS


def test_a_job_s_own_requests_keep_the_full_attempts(dropping, monkeypatch):
    # Not waited out here (the backoff of six attempts takes about 14 s): the strategy asked for.
    from pyarrow import fs

    asked = []
    real = fs.AwsStandardS3RetryStrategy
    monkeypatch.setattr(fs, "AwsStandardS3RetryStrategy", lambda max_attempts: asked.append(max_attempts) or real(max_attempts))
    storage.location("s3://bucket/runs")
    assert asked == [storage.RETRY_ATTEMPTS] and storage.RETRY_ATTEMPTS > storage.PREFLIGHT_ATTEMPTS
