"""Auth, tried as an adversary (issue 10, "Auth"): an open service beyond loopback, a secret
echoed in an error, key comparison that can be timed, and client text minted into metric labels."""

import hmac
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client.parser import text_string_to_metric_families

from qvae.cli import main
from qvae.service.accounts import Keys
from qvae.service.app import Service
from qvae.service.settings import KeyConfig, ServiceConfig, check_bind, is_loopback
from qvae.service.testing import free_port, running_service

ROOT = Path(__file__).resolve().parents[1]
KEY = "auth-test-key-0001"
TINY_RBM = {"weight": [[0.0]], "visible_bias": [0.0], "hidden_bias": [0.0]}


def serve_cli(tmp_path: Path, config: dict, *args: str, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    """`qvae serve` as a user runs it. A service that starts instead of refusing is killed when
    the bounded wait runs out, and the test fails on its exit status."""
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "qvae", "serve", "--config", str(path),
           "--port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------ require_auth beyond loopback
@pytest.mark.parametrize(("config", "args", "named"), [
    ({"require_auth": False}, ["--host", "0.0.0.0"], "--host 0.0.0.0"),
    ({"require_auth": False, "host": "0.0.0.0"}, [], "host: 0.0.0.0"),
])
def test_open_service_is_refused_beyond_loopback(tmp_path, config, args, named):
    """Measured: `require_auth: false` started on --host 0.0.0.0. Now: exit 2, one line naming
    the field, the address and where it came from, and the fix; nothing listens."""
    done = serve_cli(tmp_path, config, *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "require_auth: false" in lines[0] and named in lines[0]
    assert "127.0.0.1" in lines[0] and "keys" in lines[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost",
                                  "LOCALHOST", "::ffff:127.0.0.1"])
def test_loopback_addresses_may_serve_without_keys(host):
    assert is_loopback(host)
    check_bind(ServiceConfig(require_auth=False), host, "--host")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "192.168.1.2", "fe80::1",
                                  "sampler-host", "localhost.example.org", ""])
def test_other_addresses_need_keys(host):
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="require_auth: false"):
        check_bind(ServiceConfig(require_auth=False), host, "--host")
    check_bind(ServiceConfig(keys=[{"key": KEY}]), host, "--host")  # with keys: allowed


def test_loopback_host_flag_overrides_an_open_config_host():
    """The check is on the final address: --host 127.0.0.1 makes `host: 0.0.0.0` harmless."""
    config = ServiceConfig(require_auth=False, host="0.0.0.0")
    check_bind(config, "127.0.0.1", "--host")


# ------------------------------------------------------------------------- secrets in messages
def test_short_key_in_env_is_not_echoed(tmp_path, monkeypatch, capsys):
    """Measured: a short key in QVAE_API_KEYS was echoed back in the startup error."""
    secret = "s3cr3t"
    monkeypatch.setenv("QVAE_API_KEYS", f"{KEY},{secret}")
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump({"port": free_port()}))
    assert main(["serve", "--config", str(path)]) == 2  # refused before anything listens
    err = capsys.readouterr().err
    assert secret not in err and KEY not in err
    assert len(err.strip().splitlines()) == 1
    assert "QVAE_API_KEYS" in err and "entry 2" in err and "at least 8" in err


def test_short_key_in_config_is_not_echoed(tmp_path, capsys):
    secret = "s3cr3t"
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": "lab", "key": secret}]}))
    assert main(["serve", "--config", str(path)]) != 0
    err = capsys.readouterr().err
    assert secret not in err and "keys.0.key" in err


def test_remote_client_does_not_echo_a_mistyped_key():
    """`--set backend.api_key=12345678` arrives as a YAML int; the error must not quote it."""
    from backends.remote import RemoteSampler

    with pytest.raises(ValueError, match="api_key") as info:
        RemoteSampler(url="http://127.0.0.1:1", api_key=12345678)
    assert "12345678" not in str(info.value)


def test_unknown_key_is_not_echoed(monkeypatch):
    service = Service(ServiceConfig(keys=[{"name": "lab", "key": KEY}]))
    guess = KEY[:-1] + "X"
    with pytest.raises(Exception) as info:
        service.caller(HTTPAuthorizationCredentials(scheme="Bearer", credentials=guess))
    assert info.value.status_code == 401 and guess not in str(info.value.detail)


# ------------------------------------------------------------------------ constant-time compare
def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    """Measured: keys were looked up in a dict (hash, then `==` stopping at the first differing
    byte). Now every configured key goes through hmac.compare_digest, even after a match."""
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    configured = [KeyConfig(key=f"key-number-{i:04d}", name=f"k{i}") for i in range(5)]
    keys = Keys(configured)
    for secret, expected in [(configured[0].key, configured[0]), (configured[4].key,
                             configured[4]), ("not-a-key-at-all", None), ("", None)]:
        calls.clear()
        assert keys.get(secret) is expected
        assert len(calls) == len(configured)  # no early exit on a match or a miss
        assert len({n for pair in calls for n in pair}) == 1  # equal lengths: digests compared


def test_service_authenticates_through_the_constant_time_path(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    service = Service(ServiceConfig(keys=[{"name": "a", "key": KEY}, {"key": KEY + "-2"}]))
    key = service.caller(HTTPAuthorizationCredentials(scheme="Bearer", credentials=KEY))
    assert key.name == "a" and len(calls) == 2


# --------------------------------------------------------------------------------- metric labels
def label_values(text: str) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                values.setdefault(name, set()).add(value)
    return values


def test_client_chosen_names_never_become_metric_labels():
    """Measured: POST /v1/sample with backend "zzz1" created qvae_requests_total{backend="zzz1"}.
    Now every label value is from the server's vocabulary; a made-up backend is `other`."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with running_service({"keys": [{"name": "lab", "key": KEY}]}) as url:
        for i in range(3):
            r = httpx.post(f"{url}/v1/sample", headers=headers, json={
                "backend": f"zzz{i}", "num_samples": 1, "rbm": TINY_RBM})
            assert r.status_code == 422 and "backend" in r.text
        r = httpx.post(f"{url}/v1/sample", headers=headers, json={  # a known backend keeps its name
            "backend": "gibbs", "num_samples": 1, "rbm": TINY_RBM, "options": {"zzz_opt": 1}})
        assert r.status_code == 422 and "zzz_opt" in r.text
        assert httpx.get(f"{url}/zzz-path", headers=headers).status_code == 404
        assert httpx.get(f"{url}/v1/jobs/zzz-job", headers=headers).status_code == 404
        assert httpx.get(f"{url}/v1/backends",
                         headers={"Authorization": "Bearer zzz-key-guess"}).status_code == 401
        text = httpx.get(f"{url}/metrics").text
    assert "zzz" not in text
    labels = label_values(text)
    from backends.registry import registered
    assert labels["backend"] <= {"", "other", *registered()}
    assert "other" in labels["backend"] and "gibbs" in labels["backend"]
    assert labels["endpoint"] <= {"/v1/sample", "/v1/jobs/{job_id}", "/v1/backends", "/healthz",
                                  "/metrics", "/openapi.json", "/docs", "other"}
    assert all(s.isdigit() and len(s) == 3 for s in labels["status"])
    requests = {(s.labels["endpoint"], s.labels["backend"], s.labels["status"]): s.value
                for f in text_string_to_metric_families(text) if f.name == "qvae_requests"
                for s in f.samples if s.name == "qvae_requests_total"}
    assert requests[("/v1/sample", "other", "422")] == 3
    assert requests[("/v1/sample", "gibbs", "422")] == 1
