"""Who can reach the local Argilla: its login is random and private per data folder, it binds loopback unless told
otherwise with a flag that names the risk, it answers only Host headers naming itself, it lets no other browser origin
read its answers, and its processes do not inherit the user's provider keys.
"""

from __future__ import annotations

import http.client
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services.argilla.credentials import load_or_create_credentials, secure_data_dir
from services.argilla.exposure import EXPOSE_FLAG, check_bind_address

REPO_ROOT = Path(__file__).resolve().parents[2]
OLD_FIXED_LOGIN = ("12345678", "argilla.apikey")
PROVIDER_KEYS = {"OPENAI_API_KEY": "sk-test-openai-0a1b2c3d", "HF_TOKEN": "hf_test_token_4e5f6a",
                 "ANTHROPIC_API_KEY": "sk-ant-test-7b8c9d", "GITHUB_TOKEN": "ghp_test_0e1f2a3b",
                 "AWS_SECRET_ACCESS_KEY": "aws-test-secret-4c5d6e", "AWS_ACCESS_KEY_ID": "AKIATESTKEYID000",
                 "GOOGLE_APPLICATION_CREDENTIALS": "/tmp/test-service-account-7f8a.json"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def request(server, method: str, path: str, headers: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request(method, path, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_login_is_random_private_and_stable_per_folder(tmp_path):
    first = load_or_create_credentials(secure_data_dir(tmp_path / "a"))
    again = load_or_create_credentials(tmp_path / "a")
    other = load_or_create_credentials(secure_data_dir(tmp_path / "b"))
    assert (again.password, again.api_key) == (first.password, first.api_key)  # created once, then reused
    assert first.password != other.password and first.api_key != other.api_key
    assert first.password not in OLD_FIXED_LOGIN and first.api_key not in OLD_FIXED_LOGIN
    assert len(first.password) >= 20 and len(first.api_key) >= 40
    assert mode(first.path) == 0o600 and mode(tmp_path / "a") == 0o700
    assert json.loads(first.path.read_text())["api_key"] == first.api_key


def test_a_login_file_made_readable_by_others_is_made_private_again(tmp_path):
    login = load_or_create_credentials(secure_data_dir(tmp_path / "data"))
    login.path.chmod(0o644)
    assert load_or_create_credentials(tmp_path / "data").api_key == login.api_key
    assert mode(login.path) == 0o600


def test_a_broken_login_file_is_a_clear_error(tmp_path):
    data = secure_data_dir(tmp_path / "data")
    (data / "credentials.json").write_text('{"username": "argilla", "password": "short"')
    with pytest.raises(Exception, match="unreadable.*delete it to get a new login"):
        load_or_create_credentials(data)


def test_an_older_world_readable_data_folder_is_made_private(tmp_path):
    data = tmp_path / "old"
    (data / "logs").mkdir(parents=True)
    (data / "argilla.db").write_bytes(b"")
    (data / "logs" / "server.log").write_text("")
    for path, old_mode in ((data, 0o755), (data / "logs", 0o755), (data / "argilla.db", 0o644)):
        path.chmod(old_mode)
    secure_data_dir(data)
    assert (mode(data), mode(data / "logs"), mode(data / "argilla.db")) == (0o700, 0o700, 0o600)


def test_a_folder_that_is_not_ours_is_refused_and_left_as_it_was(tmp_path, local_server):
    folder = tmp_path / "notes"
    folder.mkdir(mode=0o755)
    (folder / "todo.txt").write_text("mine")
    with pytest.raises(local_server.LocalArgillaError, match="not empty and holds no local Argilla data"):
        local_server.start_local_argilla(folder)
    assert mode(folder) == 0o755 and sorted(p.name for p in folder.iterdir()) == ["todo.txt"]


def test_the_server_uses_the_folders_login_and_keeps_its_files_private(argilla_server):
    data = argilla_server.data_dir
    login = load_or_create_credentials(data)
    assert (argilla_server.api_key, argilla_server.password) == (login.api_key, login.password)
    assert request(argilla_server, "GET", "/api/v1/me", {"X-Argilla-Api-Key": login.api_key}).status == 200
    assert request(argilla_server, "GET", "/api/v1/me", {"X-Argilla-Api-Key": OLD_FIXED_LOGIN[1]}).status == 401
    assert mode(data) == 0o700
    for name in ("credentials.json", "argilla.db", "local-argilla.json", "logs/server.log", "logs/redis.log"):
        assert mode(data / name) == 0o600, name
    pid_file = (data / "local-argilla.json").read_text()
    assert login.password not in pid_file and login.api_key not in pid_file


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "example.org"])
def test_a_non_loopback_address_is_refused_without_the_flag(tmp_path, local_server, host):
    with pytest.raises(local_server.LocalArgillaError, match=EXPOSE_FLAG):
        local_server.start_local_argilla(tmp_path / "data", host=host)
    assert not (tmp_path / "data").exists()  # refused before anything was created
    check_bind_address(host, expose_on_network=True)  # the flag accepts the risk
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        check_bind_address(loopback, expose_on_network=False)


def test_the_command_line_refuses_a_non_loopback_address_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.argilla", "start", "--data-dir", str(tmp_path / "d"),
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert EXPOSE_FLAG in result.stderr and "Traceback" not in result.stderr
    assert "starting argilla" not in result.stdout and not (tmp_path / "d").exists()


def test_a_host_header_naming_another_host_is_rejected(argilla_server):
    key = {"X-Argilla-Api-Key": argilla_server.api_key}
    port = argilla_server.port
    for host in (f"rebind.example:{port}", "evil.test", f"127.0.0.1.nip.io:{port}"):
        assert request(argilla_server, "GET", "/api/v1/me", {**key, "Host": host}).status == 400, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert request(argilla_server, "GET", "/api/v1/me", {**key, "Host": host}).status == 200, host


def test_a_cors_preflight_from_another_origin_gets_no_allow_origin(argilla_server):
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "x-argilla-api-key"}
    for origin in ("http://evil.example", "http://127.0.0.1:1", "null"):
        answer = request(argilla_server, "OPTIONS", "/api/v1/me", {**preflight, "Origin": origin})
        assert answer.getheader("Access-Control-Allow-Origin") is None, origin
        simple = request(argilla_server, "GET", "/api/v1/me",
                         {"Origin": origin, "X-Argilla-Api-Key": argilla_server.api_key})
        assert simple.getheader("Access-Control-Allow-Origin") is None, origin
    own = request(argilla_server, "OPTIONS", "/api/v1/me", {**preflight, "Origin": argilla_server.url})
    assert own.getheader("Access-Control-Allow-Origin") == argilla_server.url


def test_the_server_processes_inherit_no_provider_keys(tmp_path, local_server, argilla_venv, monkeypatch):
    for name, value in PROVIDER_KEYS.items():
        monkeypatch.setenv(name, value)
    with local_server.start_local_argilla(tmp_path / "data", venv=argilla_venv) as server:
        assert request(server, "GET", "/api/v1/me", {"X-Argilla-Api-Key": server.api_key}).status == 200
        for pid in (server.server_pid, server.redis_pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode()
            names = {entry.split("=", 1)[0] for entry in environ.split("\0") if entry}
            assert not names & set(PROVIDER_KEYS), names
            for secret in (*PROVIDER_KEYS.values(), server.password, server.api_key):
                assert secret not in environ  # the login travels in the 0600 file, not the environment
