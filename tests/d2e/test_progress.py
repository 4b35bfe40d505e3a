"""The local run's console: stage lines, progress and errors on the terminal, everything else in run.log.

The capture and the console run around a real kfp.local pipeline of two small lightweight components, whose output
is what kfp prints for any stage; the components report progress with the stages' own reporter.
"""

import io
import json

import pytest
from kfp import dsl, local

from components.progress import PROGRESS_INTERVAL_ENV, ProgressReporter, format_progress
from d2e.console import EventFile
from d2e.progress import RunConsole, summary_file, watch_run
from tests.conftest import PROJECT_ROOT


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def make_rows(rows: int, data: dsl.Output[dsl.Dataset]):
    import os

    import pandas as pd

    from components.progress import ProgressReporter

    print("EXECUTOR CHATTER that belongs in the log only")
    os.makedirs(data.path, exist_ok=True)
    progress = ProgressReporter("make_rows", rows, tokens=True, failures=True)
    for _ in range(rows):
        progress.advance(tokens=10)
    pd.DataFrame({"x": range(rows)}).to_parquet(os.path.join(data.path, "train.parquet"))


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def keep_rows(data: dsl.Input[dsl.Dataset], limit: int, kept: dsl.Output[dsl.Dataset]):
    import os

    import pandas as pd

    frame = pd.read_parquet(os.path.join(data.path, "train.parquet"))
    if len(frame) > limit:
        raise ValueError(f"too many rows: {len(frame)} > {limit}")
    os.makedirs(kept.path, exist_ok=True)
    frame.to_parquet(os.path.join(kept.path, "train.parquet"))


@dsl.pipeline(name="two-stages")
def two_stages(rows: int = 3, limit: int = 10):
    made = make_rows(rows=rows)
    keep_rows(data=made.outputs["data"], limit=limit)


@pytest.fixture
def local_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "0")  # every progress update gets its plain line
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / ".kfp"),
               raise_on_error=True)
    return tmp_path


def test_the_terminal_shows_stages_and_progress_and_the_log_keeps_the_rest(local_pipeline, capfd):
    with watch_run(local_pipeline, local_pipeline / ".kfp", two_stages):
        two_stages(rows=3)
    terminal = capfd.readouterr()
    assert terminal.out == ""
    lines = terminal.err.splitlines()
    assert lines[0] == f"Log of every stage: {local_pipeline / 'run.log'} (--verbose shows it live)"
    assert lines[1] == "[1/2] make_rows started"
    assert [line.split(": ", 1)[0] for line in lines[2:5]] == ["      make_rows"] * 3
    assert lines[4].startswith("      make_rows: 3/3 rows (100%), ") and lines[4].endswith(", 30 tokens, 0 failed")
    assert lines[5].startswith("[1/2] make_rows done in ") and lines[5].endswith(" s: - rows in, 3 rows out")
    assert lines[6] == "[2/2] keep_rows started (3 rows in)"
    assert lines[7].startswith("[2/2] keep_rows done in ") and lines[7].endswith(" s: 3 rows in, 3 rows out")
    assert len(lines) == 8
    log = (local_pipeline / "run.log").read_text()
    for kept_in_log in ("EXECUTOR CHATTER", "executor_input", "Executing task", "make_rows: 3/3 rows"):
        assert kept_in_log in log


def test_a_failing_stage_shows_its_last_lines_and_the_log(local_pipeline, capfd):
    with pytest.raises(RuntimeError):
        with watch_run(local_pipeline, local_pipeline / ".kfp", two_stages):
            two_stages(rows=3, limit=1)
    err = capfd.readouterr().err
    assert "[2/2] keep_rows FAILED after " in err
    assert "  | ValueError: too many rows: 3 > 1" in err
    assert f"The whole log: {local_pipeline / 'run.log'}" in err
    assert "too many rows: 3 > 1" in (local_pipeline / "run.log").read_text()


def test_verbose_shows_the_stages_own_output_live_too(local_pipeline, capfd):
    with watch_run(local_pipeline, local_pipeline / ".kfp", two_stages, verbose=True):
        two_stages(rows=2)
    err = capfd.readouterr().err
    assert "EXECUTOR CHATTER" in err and "[2/2] keep_rows done in " in err
    assert "EXECUTOR CHATTER" in (local_pipeline / "run.log").read_text()


def test_a_stage_served_from_the_cache_says_so_with_the_rows_it_served(local_pipeline, capfd):
    from d2e.console import kfp_local

    root, logs = local_pipeline / ".kfp", []
    for rows in (3, 3, 4):  # the second run is served from the cache; a new input runs both stages again
        with kfp_local(root, cache=True), watch_run(local_pipeline, root, two_stages):
            two_stages(rows=rows)
        logs.append((local_pipeline / "run.log").read_text())
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[")]
    assert [line.split(" s: ")[0].split(" done in ")[0] for line in lines] == [
        "[1/2] make_rows started", "[1/2] make_rows", "[2/2] keep_rows started (3 rows in)", "[2/2] keep_rows",
        "[1/2] make_rows served from the cache (not run again): - rows in, 3 rows out",
        "[2/2] keep_rows served from the cache (not run again): 3 rows in, 3 rows out",
        "[1/2] make_rows started", "[1/2] make_rows", "[2/2] keep_rows started (4 rows in)", "[2/2] keep_rows"]
    assert lines[-1].endswith(" s: 4 rows in, 4 rows out")
    assert ["cache hit" in log for log in logs] == [False, True, False]


def test_a_sharded_stage_counts_the_shards_the_cache_served_and_those_that_ran(tmp_path):
    import pandas as pd

    run_dir = tmp_path / "earlier-run" / "for-loop-2" / "gen"
    (run_dir / "out").mkdir(parents=True)
    pd.DataFrame({"x": range(2)}).to_parquet(run_dir / "out" / "train.parquet")
    (tmp_path / ".kfp_cache").mkdir()
    entry = {"out": {"__kfp_artifact__": True, "uri": str(run_dir / "out"), "name": "out", "metadata": {}}}
    (tmp_path / ".kfp_cache" / "abcdef123456ffff.json").write_text(json.dumps(entry))
    ran = tmp_path / "this-run" / "for-loop-2" / "gen" / "out"
    ran.mkdir(parents=True)
    pd.DataFrame({"x": range(3)}).to_parquet(ran / "train.parquet")
    terminal = io.StringIO()
    console = RunConsole(terminal, tmp_path, {"gen": []}, tmp_path / "run.log", interactive=False,
                         sharded=frozenset({"gen"}), shards=2)
    console.line("12:00:00.001 - INFO - Task gen cache hit (key=abcdef123456); skipping execution.")
    assert terminal.getvalue() == ""  # one shard of two: the stage is not over
    console.line("12:00:00.002 - INFO - Executing task \x1b[96m'gen'\x1b[0m")
    console.line("12:00:01.000 - INFO - Task \x1b[96m'gen'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
    assert terminal.getvalue().startswith("[1/1] gen done in ")
    assert terminal.getvalue().endswith(" s (1 of 2 shards served from the cache): - rows in, 5 rows out\n")


def test_the_live_bar_shows_count_rate_tokens_and_failures(tmp_path):
    from rich.console import Console

    console = RunConsole(io.StringIO(), tmp_path, {"generate-queries-component": []}, tmp_path / "run.log",
                         interactive=True)
    try:
        console.line("21:15:04.009 - INFO - Executing task \x1b[96m'generate-queries-component'\x1b[0m")
        console.event({"stage": "generate_queries", "unit": "rows", "done": 2, "total": 8, "tokens": 1234,
                       "failed": 1, "elapsed": 4.0})
        shown = Console(file=io.StringIO(), width=200, record=True)
        shown.print(console.bar)
        text = shown.export_text()
    finally:
        console.close()
    assert "generate_queries" in text and "2/8" in text
    assert "0.50 rows/s, ETA 0:12, 1,234 tokens, 1 failed" in text


def test_events_of_another_stage_or_before_any_start_are_ignored(tmp_path):
    terminal = io.StringIO()
    console = RunConsole(terminal, tmp_path, {"a": []}, tmp_path / "run.log", interactive=False)
    console.event({"stage": "embed_score", "unit": "texts", "done": 1, "total": 1, "elapsed": 1.0})
    assert terminal.getvalue() == ""


def test_plain_progress_line_format():
    event = {"stage": "embed_score", "unit": "texts", "done": 50, "total": 200, "tokens": None, "failed": None,
             "elapsed": 25.0}
    assert format_progress(event) == "embed_score: 50/200 texts (25%), 2.00 texts/s, ETA 1:15"
    assert format_progress({**event, "done": 0, "elapsed": 0.0}) == "embed_score: 0/200 texts (0%), - texts/s, ETA -"


def test_the_reporter_appends_json_events_and_logs_plain_lines(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("D2E_PROGRESS_FILE", str(tmp_path / "events.jsonl"))
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "3600")  # only the last update gets a line
    progress = ProgressReporter("generate_queries", 2, tokens=True, failures=True)
    with caplog.at_level("INFO", logger="generate_queries"):
        progress.advance(tokens=5)
        progress.advance(tokens=7, failed=1)
    events = EventFile(tmp_path / "events.jsonl").read()
    assert [(e["done"], e["total"], e["tokens"], e["failed"]) for e in events] == [(0, 2, 0, 0), (1, 2, 5, 0),
                                                                                 (2, 2, 12, 1)]
    assert [record.getMessage().split(",")[0] for record in caplog.records] == ["generate_queries: 2/2 rows (100%)"]


def test_an_event_file_hands_out_only_complete_new_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    events = EventFile(path)
    assert events.read() == []  # not written yet
    path.write_text(json.dumps({"done": 1}) + "\nnot json\n{\"done\"")
    assert events.read() == [{"done": 1}]
    with path.open("a") as handle:
        handle.write(": 2}\n")
    assert events.read() == [{"done": 2}]


def test_the_summary_is_printed_and_kept_as_markdown(tmp_path, capsys):
    with summary_file(tmp_path / "summary.md"):
        print("Done in 3 s. Outputs in /x:")
        print("  /x/train.parquet  (3 rows)")
    assert capsys.readouterr().out == "Done in 3 s. Outputs in /x:\n  /x/train.parquet  (3 rows)\n"
    assert (tmp_path / "summary.md").read_text() == (
        "# Run summary\n\n```text\nDone in 3 s. Outputs in /x:\n  /x/train.parquet  (3 rows)\n```\n")
