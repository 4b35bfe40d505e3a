"""Every command that fails ends in one line that says what failed, never shows a key, never a raw traceback.

Real processes (`python pipeline.py ...`), so everything a user would see is checked: distilabel's rich traceback
hook, the stages' own output in a local run, the HTTP clients' messages. The keys are fake and recognisable.
"""

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest

from components.common import StageError
from components.tracebacks import redact, stage_excepthook
from d2e.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, report_failure
from tests.conftest import PROJECT_ROOT
from tests.support.servers import free_port

KEYS = {"OPENAI_API_KEY": "sk-FAKE-openai-DO-NOT-LEAK-7f3a9c", "ARGILLA_API_KEY": "argilla.FAKE-DO-NOT-LEAK-51d2e8",
        "HF_TOKEN": "hf_FAKEtokenDONOTLEAK0b4e6d", "KFP_TOKEN": "kfp-FAKE-bearer-DO-NOT-LEAK-88aa"}
TRACEBACK = "Traceback (most recent call last)"


def run_cli(*argv: str, tmp_path, timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("OPENAI_BASE_URL", "D2E_DEBUG")}
    env.update(KEYS, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), GCE_METADATA_HOST="127.0.0.1:9",
               GCE_METADATA_IP="127.0.0.1:9", GOOGLE_APPLICATION_CREDENTIALS="", **extra_env)
    env.pop("GOOGLE_APPLICATION_CREDENTIALS")
    env.pop("STORAGE_EMULATOR_HOST", None)
    return subprocess.run([sys.executable, "pipeline.py", *argv], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_no_key(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    for name, value in KEYS.items():
        assert value not in output, f"{name} leaked:\n{output[-3000:]}"
        assert value[:12] not in output, f"the start of {name} leaked:\n{output[-3000:]}"


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


# Each command, made to fail by something that is not a StageError of ours (a library's own exception).
UNEXPECTED = {
    # No Google credentials for a gs:// cache: before, distilabel's hook printed `saved_key = 'sk-...'`.
    "estimate": lambda tmp: ["estimate", "--llm", "openai:gpt-4o", "--llm-cache-uri", "gs://no-such-bucket/llm",
                             "--limit", "2"],
    "compile": lambda tmp: ["compile", "--output", str(a_file(tmp) / "pipeline.yaml")],
    "manifests": lambda tmp: ["manifests", "--output", str(a_file(tmp) / "manifests" / "pipeline.yaml")],
    "submit": lambda tmp: ["submit", "--target", "kfp", "--template", "pipeline.yaml", "--host",
                           f"http://127.0.0.1:{free_port()}"],
}


@pytest.mark.parametrize("command", sorted(UNEXPECTED))
def test_an_unexpected_failure_is_one_line_naming_the_command_with_no_key_and_no_traceback(command, tmp_path):
    result = run_cli(*UNEXPECTED[command](tmp_path), tmp_path=tmp_path)
    assert result.returncode == EXIT_FAILED, result.stderr[-3000:]
    assert_no_key(result)
    assert TRACEBACK not in result.stdout + result.stderr and "│" not in result.stderr  # no plain or rich traceback
    line = last_line(result)
    assert line.startswith(f"error: `{command}` failed with ") and line.endswith("run again with --debug for the "
                                                                                 "traceback."), line


def test_with_debug_the_traceback_is_shown_without_locals_or_keys(tmp_path):
    result = run_cli("--debug", *UNEXPECTED["estimate"](tmp_path), tmp_path=tmp_path)
    assert result.returncode == EXIT_FAILED
    assert TRACEBACK in result.stderr and "DefaultCredentialsError" in result.stderr
    assert_no_key(result)
    assert "saved_key" not in result.stderr and "│" not in result.stderr  # no rich frame boxes, no locals
    after = run_cli(*UNEXPECTED["compile"](tmp_path), "--debug", tmp_path=tmp_path)  # also after the command
    assert TRACEBACK in after.stderr and after.returncode == EXIT_FAILED


def test_a_stage_error_is_its_message_alone(tmp_path):
    result = run_cli("submit", "--target", "vertex", "--param", "llm_cache_uri=gs://bucket/llm", tmp_path=tmp_path)
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.strip().splitlines() == ["error: Vertex submission needs --project, --region, "
                                                  "--pipeline-root, --service-account."]


def test_submitting_an_api_model_without_an_llm_cache_warns_first(tmp_path):
    result = run_cli("submit", "--target", "vertex", tmp_path=tmp_path)  # the cluster default LLM is an API model
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("WARNING: no LLM cache") and "llm_cache_uri=gs://" in first
    local = run_cli("submit", "--target", "vertex", "--param", "llm=local", tmp_path=tmp_path)
    assert "WARNING" not in local.stderr


@pytest.mark.slow
def test_a_local_run_with_a_bad_source_stops_in_seconds_with_the_reason_and_no_traceback(tmp_path):
    # A folder that exists passes the pre-flight check; the stage itself finds it has no text column.
    folder = tmp_path / "bad"
    folder.mkdir()
    pd.DataFrame({"text": ["a chunk"], "split": ["train"]}).to_parquet(folder / "train.parquet")
    result = run_cli("run", "--dataset", str(folder), "--output-dir", str(tmp_path / "out"),
                     "--no-argilla", tmp_path=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert_no_key(result)
    assert "StageError" in output and "has no text column 'page_content'" in output
    assert TRACEBACK not in output  # the stage process shows a StageError as its message alone
    assert "retry" not in output.lower()  # no task-level retries: a StageError is the same on every try


@pytest.mark.slow
def test_a_local_run_against_a_closed_port_stops_naming_it_without_a_key(tmp_path, small_chunks):
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli("run", "--dataset", str(small_chunks), "--output-dir", str(tmp_path / "out"), "--no-argilla",
                     "--llm", "openai:gpt-4o", "--llm-base-url", base_url, "--llm-max-retries", "1",
                     tmp_path=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert_no_key(result)
    assert f"could not connect to {base_url}" in output and TRACEBACK not in output


def test_ctrl_c_is_a_short_message_and_exit_status_130(tmp_path):
    env = {**os.environ, **KEYS, "PYTHONPATH": str(PROJECT_ROOT)}
    # The command is replaced by a wait that says when it started, so the signal lands inside it.
    code = ("import sys, time\nfrom d2e import cli\n"
            "cli.dispatch = lambda args: (print('ready', flush=True), time.sleep(600))\n"
            "sys.exit(cli.main(['compile']))")
    # As from a terminal: SIGINT at its default (a pytest-xdist worker ignores it, and a child inherits that).
    process = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED
    assert err.strip() == "interrupted: `compile` stopped before it finished." and TRACEBACK not in err


def test_distilabels_traceback_hook_is_replaced_once_distilabel_is_imported_through_our_code(tmp_path):
    code = ("import os\nfrom components.generate_queries import build_llm, parse_llm_spec\n"
            "build_llm(parse_llm_spec('openai:gpt-4o'))\n"
            "def fail():\n    secret = os.environ['OPENAI_API_KEY']\n    raise RuntimeError('boom')\nfail()")
    env = {**os.environ, **KEYS, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "RuntimeError: boom" in result.stderr
    assert KEYS["OPENAI_API_KEY"] not in result.stderr and "secret =" not in result.stderr


def test_report_failure_redacts_a_key_inside_an_exceptions_own_message(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", KEYS["HF_TOKEN"])
    status = report_failure(ValueError(f"bad header Authorization: Bearer {KEYS['HF_TOKEN']}\nsecond line"),
                            "run")
    err = capsys.readouterr().err
    assert status == EXIT_FAILED and KEYS["HF_TOKEN"] not in err and err.count("\n") == 1
    assert "Bearer <redacted> second line" in err
    assert redact("short") == "short"


def test_the_stage_hook_prints_a_stage_error_alone_and_with_debug_its_traceback(monkeypatch, capsys):
    try:
        raise StageError("no such folder: fix --dataset")
    except StageError as error:
        stage_excepthook(StageError, error, error.__traceback__)
        assert capsys.readouterr().err == "StageError: no such folder: fix --dataset\n"
        monkeypatch.setenv("D2E_DEBUG", "1")
        stage_excepthook(StageError, error, error.__traceback__)
        assert TRACEBACK in capsys.readouterr().err
