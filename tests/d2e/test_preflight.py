"""`run` checks what it can before anything starts: one `error:` line per problem, exit 2, nothing created."""

import pytest

from d2e.cli import main


@pytest.fixture
def run_argv(tmp_path, monkeypatch):
    """`run` with an output folder and a local Argilla folder that must not be created by a refused run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()

    def argv(*flags: str) -> list[str]:
        return ["run", "--output-dir", str(tmp_path / "out"), "--argilla-data-dir", str(tmp_path / "argilla"),
                *flags]

    return argv


@pytest.mark.parametrize("flags, message", [
    (["--llm", "gpt-4o"], "error: Unknown --llm 'gpt-4o'. Use 'local', 'llamacpp:/path/model.gguf' or 'openai:MODEL'."),
    (["--llm", "llamacpp:/no/such/model.gguf"], "error: --llm llamacpp:/no/such/model.gguf: no GGUF file at"),
    (["--llm-prices", "{gpt-4o: 1}"], "error: --llm-prices: llm prices must be JSON"),
    (["--query-styles", "question,riddle"], "error: --query-styles: query styles 'question,riddle': use a comma"),
    (["--dataset", "docs/typo"], "error: Dataset source: no such folder or file: docs/typo"),
    (["--dataset", "./missing.parquet"], "error: Dataset source: no such folder or file: ./missing.parquet"),
    (["--embedding-model", "./models/mine"], "error: --embedding-model: no such folder or file: ./models/mine"),
    (["--miner-model", "/no/such/model"], "error: --miner-model: no such folder or file: /no/such/model"),
    (["--export-uri", "s3://bucket/x"], "error: --export-uri s3://bucket/x: only local folders and gs://BUCKET/PREFIX"),
    (["--model-export-uri", "gs:///models"], "error: --model-export-uri gs:///models: no bucket name"),
    (["--llm-cache-uri", "https://cache.example/x"], "error: --llm-cache-uri https://cache.example/x: only local"),
    (["--hub-repo", "my dataset"], "error: --hub-repo 'my dataset': a Hugging Face Hub repo is owner/name."),
    (["--hub-model-repo", "a/b/c"], "error: --hub-model-repo 'a/b/c': a Hugging Face Hub repo is owner/name."),
    (["--llm-base-url", "localhost:8000/v1"], "error: --llm-base-url 'localhost:8000/v1': an http:// or https://"),
    (["--argilla-url", "argilla.local"], "error: --argilla-url 'argilla.local': an http:// or https:// URL"),
    (["--argilla-port", "70000"], "error: --argilla-port 70000: a port is 0 (any free one) to 65535."),
])
def test_a_bad_value_stops_the_run_before_anything_starts(flags, message, run_argv, tmp_path, capsys):
    assert main(run_argv(*flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "argilla").exists()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("the user's file")
    assert main(["run", "--output-dir", "results", "--no-argilla"]) == 2
    assert capsys.readouterr().err == "error: --output-dir results is a file, not a folder.\n"
    assert main(["run", "--output-dir", "results/run1", "--no-argilla"]) == 2
    assert f"{tmp_path / 'results'} is a file, not a folder." in capsys.readouterr().err
    assert (tmp_path / "results").read_text() == "the user's file"


def test_every_problem_is_reported_at_once(run_argv, tmp_path, capsys):
    assert main(run_argv("--llm", "bogus", "--export-uri", "s3://b/x", "--embedding-model", "./none")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: 3 problems, nothing was started:"
    assert [line.split()[0] for line in lines[1:]] == ["Unknown", "--embedding-model:", "--export-uri"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "--temperature", "nan"], "error: --temperature: temperature must be a finite number, not nan."),
    (["run", "--llm-request-timeout", "inf"], "error: --llm-request-timeout: llm_request_timeout must be a finite"),
    (["run", "--llm-concurrency", "0"], "error: --llm-concurrency: llm_concurrency must be at least 1, not 0."),
    (["run", "--generation-batch-size", "0"], "error: --generation-batch-size: generation_batch_size must be at "
                                              "least 1, not 0."),
    (["run", "--embedding-batch-size", "0"], "error: --embedding-batch-size: embedding_batch_size must be at least 1"),
    (["run", "--embedding-batch-size", "1000000"], "error: --embedding-batch-size: embedding_batch_size must be at "
                                                   "most 65536"),
    (["run", "--max-failure-rate", "-0.1"], "error: --max-failure-rate: max_failure_rate must be at least 0"),
    (["run", "--num-hard-negatives", "5000"], "error: --num-hard-negatives: num_hard_negatives must be at most 100"),
    (["run", "--finetune-epochs", "1e9"], "error: --finetune-epochs: finetune_epochs must be at most 1000"),
    (["estimate", "--llm-batch-max-wait=-inf"], "error: --llm-batch-max-wait: llm_batch_max_wait must be a finite"),
])
def test_nan_inf_zero_and_out_of_range_flags_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
