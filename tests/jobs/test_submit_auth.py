"""`rsrefseg submit` / `rsrefseg jobs` find Ray's token where Ray's docs say it lives."""

from __future__ import annotations

import pytest

from rsrefseg.jobs.submit import auth_token
from rsrefseg.platform.errors import ConfigError


def test_token_order_env_then_path_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token({}) == ""  # none anywhere: no header, Ray's own error explains
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_token({}) == "home-token"
    (tmp_path / "t").write_text("path-token")
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}) == "path-token"
    assert auth_token({"RAY_AUTH_TOKEN": "env-token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}) == "env-token"
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH=.*missing.*cannot read"):
        auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_the_client_sends_the_token_as_a_bearer_header(tmp_path, monkeypatch):
    from rsrefseg.jobs import submit

    seen = {}

    class FakeClient:
        def __init__(self, address, headers=None):
            seen.update(address=address, headers=headers)

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    submit._client("http://127.0.0.1:8265")
    assert seen == {"address": "http://127.0.0.1:8265", "headers": {"Authorization": "Bearer s3cret"}}


@pytest.mark.parametrize("token, says", [("", "no token was found here"), ("stale", "refused the Ray token found here")])
def test_a_refused_client_says_what_to_do(token, says, tmp_path, monkeypatch):
    from ray.exceptions import AuthenticationError

    from rsrefseg.jobs import submit
    from rsrefseg.platform.errors import UserError

    class RefusingClient:
        def __init__(self, address, headers=None):
            raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", RefusingClient)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    with pytest.raises(UserError, match=says) as err:
        submit._client("http://head:8265")
    assert "ray get-auth-token" in str(err.value) and "~/.ray/auth_token" in str(err.value)
