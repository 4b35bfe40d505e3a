"""The command line: the flags of `run` and `estimate` derive from the settings; old spellings still work."""

import subprocess
import sys

import pytest

from d2e import parameters
from d2e.cli import OLD_FLAGS, build_parser, main, setting_values
from tests.conftest import PROJECT_ROOT


def run_help() -> str:
    result = subprocess.run([sys.executable, "pipeline.py", "run", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_run_help_has_a_flag_per_setting_with_its_local_default_and_no_old_spelling():
    text = run_help()
    for spec in parameters.group_specs():
        assert (spec.flag in text) == spec.cli, spec.name
    assert "--finetune-batch-size N" in text and "(default: 16; cluster default: 32)" in text
    assert "--no-finetune-hard-negatives" in text and "--no-hub-private" in text
    for old in OLD_FLAGS.values():
        assert f"{old} " not in text and f"{old}," not in text, old  # accepted, not advertised


def test_old_spellings_are_hidden_aliases_of_the_derived_flags():
    args = build_parser().parse_args([
        "run", "--epochs", "2", "--learning-rate", "1e-4", "--warmup-ratio", "0.2", "--seed", "7",
        "--no-hard-negatives", "--batch-size", "4", "--concurrency", "3", "--request-timeout", "9",
        "--max-retries", "1", "--json-mode", "off", "--batch-api", "--batch-max-wait", "60", "--llm-cache", "gs://b/c"])
    values, given = setting_values(args, tuple(parameters.GROUPS))
    assert (values["finetune_epochs"], values["finetune_learning_rate"], values["finetune_warmup_ratio"]) == (
        2.0, 1e-4, 0.2)
    assert (values["finetune_seed"], values["finetune_hard_negatives"], values["generation_batch_size"]) == (
        7, False, 4)
    assert (values["llm_concurrency"], values["llm_request_timeout"], values["llm_max_retries"]) == (3, 9.0, 1)
    assert (values["llm_json_mode"], values["llm_use_batch_api"], values["llm_batch_max_wait"]) == ("off", True, 60.0)
    assert values["llm_cache_uri"] == "gs://b/c"
    assert given == set(OLD_FLAGS.keys())


def test_unset_flags_take_the_local_defaults_and_cluster_only_settings_their_defaults():
    values, given = setting_values(build_parser().parse_args(["run"]), tuple(parameters.GROUPS))
    assert given == set()
    assert values["llm"] == "local" and values["embedding_model"] == "embedded:all-MiniLM-L6-v2"
    assert (values["finetune_epochs"], values["finetune_batch_size"], values["generation_batch_size"]) == (3.0, 16, 8)
    assert values["dataset"] == "" and values["gpu_count"] == 1


def test_estimate_takes_loading_and_generation_settings_only():
    args = build_parser().parse_args(["estimate", "--limit", "3", "--llm-json-mode", "off", "--json-mode", "off"])
    values, _ = setting_values(args, ("load_docs", "generate_queries"))
    assert values["limit"] == 3 and "finetune_epochs" not in values
    with pytest.raises(SystemExit):
        build_parser().parse_args(["estimate", "--finetune-epochs", "1"])


@pytest.mark.parametrize("argv, message", [
    (["run", "--finetune-epochs", "0"], "error: --finetune-epochs: finetune_epochs must be at least 0.01, not 0.0."),
    (["run", "--limit", "-1"], "error: --limit: limit must be at least 0, not -1."),
    (["run", "--finetune-batch-size", "1"], "error: --finetune-batch-size: finetune_batch_size must be at least 2"),
    (["estimate", "--max-failure-rate", "2"], "error: --max-failure-rate: max_failure_rate must be at most 1"),
])
def test_a_value_out_of_range_is_one_line_and_exit_status_2(argv, message, capsys):
    assert main(argv) == 2  # before anything starts: no stage runs, no Argilla
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_compile_writes_the_requested_target(tmp_path, capsys):
    assert main(["compile", "--target", "vertex", "--output", str(tmp_path / "v.yaml")]) == 0
    assert "NVIDIA_L4" in (tmp_path / "v.yaml").read_text()
    assert f"Wrote {tmp_path / 'v.yaml'}" in capsys.readouterr().out
