"""The quality benchmark (`make quality`) on a tiny fixture: 30 real Kubeflow chunks with hand-written queries.

The smoke test runs the whole benchmark (embed_score, mine_negatives, one finetuning step per configuration,
evaluate) into a temporary folder; the others check the fixture, the selection and the figures without models.
"""

import re

import pandas as pd
import pytest

from benchmarks import fixture as fixture_module
from benchmarks import quality, report, stages
from benchmarks.figures import generation_figures, real_query
from components.common import chunk_id

TRAIN_CHUNKS, TEST_CHUNKS = 20, 10
STATUS = {"model_name": "hand-written", "generation_error": None}


def heading(text: str) -> str:
    """The chunk's first Markdown heading, else its first words."""
    found = re.search(r"^#+\s*(.+?)\s*$", text, re.MULTILINE)
    words = (found.group(1) if found else text).replace("?", "").split()
    return " ".join(words[:5])


def chunk_word(text: str, topic: str) -> str:
    """A longer word of the chunk that its heading lacks (so a query names something only the chunk has)."""
    words = [word for word in re.findall(r"[A-Za-z]{6,}", text) if word.lower() not in topic.lower()]
    return max(words, key=len) if words else "settings"


def query_rows(chunks: pd.DataFrame, failed: int) -> pd.DataFrame:
    """Three queries per chunk written from its heading and one of its words; the LLM negative asks about the
    next chunk; the row at position `failed` failed generation."""
    rows = []
    topics = [heading(text) for text in chunks["anchor"]]
    for number, (chunk, topic) in enumerate(zip(chunks.to_dict("records"), topics)):
        word, other = chunk_word(chunk["anchor"], topic), topics[(number + 1) % len(topics)]
        queries = {"question": f"How do I use {topic} with {word}?", "keywords": f"{topic} {word}".lower(),
                   "statement": f"I want to set up {topic} and {word}."}
        for style, positive in queries.items():
            row = {**chunk, "query_style": style, "query_variant": 0, "positive": positive,
                   "negative": f"How do I use {other}?", "generation_status": "generated", **STATUS}
            if number == failed and style == "question":
                row.update(positive=None, negative=None, generation_status="failed", generation_error="no JSON")
            rows.append(row)
    return pd.DataFrame(rows, columns=[*chunks.columns, "query_style", "query_variant", "positive", "negative",
                                       "generation_status", *STATUS])


def generated_folder(folder, kubeflow_docs, train_rows, test_rows):
    """A generate_queries-like output folder from the shortest chunks of the real corpus."""
    folder.mkdir(parents=True)
    for split, count, failed in (("train", train_rows, 3), ("test", test_rows, 2)):
        source = pd.read_parquet(kubeflow_docs / f"{split}.parquet")
        source = source[source["token_count"].between(60, 130)].head(count)
        chunks = source.rename(columns={"page_content": "anchor"})[
            ["anchor", "filename", "parent_section", "url", "token_count"]].reset_index(drop=True)
        chunks["chunk_id"] = chunks["anchor"].map(chunk_id)
        query_rows(chunks, failed).to_parquet(folder / f"{split}.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def tiny_fixture(tmp_path_factory, kubeflow_docs):
    root = tmp_path_factory.mktemp("quality")
    train = generated_folder(root / "gen-train", kubeflow_docs, TRAIN_CHUNKS, 0)
    test = generated_folder(root / "gen-test", kubeflow_docs, 0, TEST_CHUNKS)
    readme = root / "README.md"
    readme.write_text(f"# fixture\n\n{fixture_module.COUNTS_START}\nnone\n{fixture_module.COUNTS_END}\n")
    fixture_module.make_fixture([train, test], root / "fixture.parquet", readme)
    return root


GENERATION_CHUNKS = 2


@pytest.fixture(scope="module")
def benchmark(tiny_fixture, kubeflow_docs):
    """The whole benchmark, one optimizer step per configuration, written to a temporary docs file; the current
    code's generation (the real embedded LLM) on the first two test chunks of the corpus."""
    real_docs = quality.OUTPUT.read_bytes() if quality.OUTPUT.exists() else None
    # No warmup: a single step with warmup would train at learning rate 0.
    settings = stages.TrainSettings(epochs=0.01, batch_size=8, learning_rate=2e-5, warmup_ratio=0.0, seed=1,
                                    mini_batch_size=8)
    output = tiny_fixture / "docs" / "quality.md"
    generation = quality.GenerationCheck(source=str(kubeflow_docs), limit=GENERATION_CHUNKS,
                                         llm_cache=str(tiny_fixture / "llm-cache"))
    results = quality.run(tiny_fixture / "fixture.parquet", tiny_fixture / "work", output, settings,
                          generation=generation)
    assert (quality.OUTPUT.read_bytes() if quality.OUTPUT.exists() else None) == real_docs
    return results, output.read_text()


def test_every_configuration_is_in_the_table_on_the_same_queries(benchmark):
    results, text = benchmark
    configs = results["configs"]
    assert [row["name"] for row in configs] == [config.name for config in quality.CONFIGS]
    assert not any("missing" in row for row in configs)
    # One evaluation set for all: the test split's question rows the default filters kept.
    assert {row["eval_id"] for row in configs} == {results["evaluation"]["id"]}
    assert {row["eval_queries"] for row in configs} == {results["evaluation"]["queries"]}
    assert 0 < results["evaluation"]["queries"] <= TEST_CHUNKS - 1 and results["evaluation"]["corpus"] == TEST_CHUNKS
    for row in configs[1:]:
        assert row["optimizer_steps"] == 1 and set(row["intervals"]) >= {"384", "64"}
        low, gain, high = (row["intervals"]["384"][key] for key in ("low", "gain", "high"))
        assert low <= gain <= high
    by_name = {row["name"]: row for row in configs}
    # One question per chunk, minus the failed row; the round-trip filter may only remove rows; 3 styles add rows.
    assert by_name["in-batch negatives only"]["training_rows"] == TRAIN_CHUNKS - 1
    assert by_name["+ round-trip filter"]["training_rows"] <= TRAIN_CHUNKS - 1
    assert by_name["+ 3 queries per chunk"]["training_rows"] > by_name["+ round-trip filter"]["training_rows"]
    assert [by_name[name]["negatives"] for name in ("in-batch negatives only", "+ LLM negatives",
                                                    "+ mined negatives")] == ["in-batch", "llm", "mined"]
    for config in quality.CONFIGS:
        assert f"| {config.name} |" in text


def test_the_report_has_its_sections(benchmark):
    results, text = benchmark
    for section in ("## Result", "## What is compared", "## Settings", "## Machine and versions",
                    "## Generation figures", "### The current code", "### The fixture", "## What the rows look like",
                    "## The fixture and how to regenerate it"):
        assert section in text
    assert f"the same {results['evaluation']['queries']} queries" in text
    assert "sentence-transformers" in text and "make-fixture" in text
    assert len(results["samples"]) == 20
    figures = results["figures"]
    assert figures["rows"] == 3 * (TRAIN_CHUNKS + TEST_CHUNKS) and figures["valid"] == figures["rows"] - 2
    assert figures["counts"]["echoes"] == 0 and figures["counts"]["loops"] == 0
    questions = figures["by_style"]["question"]
    assert questions["rows"] == TRAIN_CHUNKS + TEST_CHUNKS and questions["real"] == questions["kept"] > 0


def test_the_current_code_generates_every_style_for_the_test_chunks_and_is_reported(benchmark, tiny_fixture):
    results, text = benchmark
    check = results["generation_check"]
    figures = check["figures"]
    # One row per style for each chunk, all of the test split, from the embedded model.
    assert check["chunks"] == GENERATION_CHUNKS and figures["rows"] == 3 * GENERATION_CHUNKS
    assert {style: values["rows"] for style, values in figures["by_style"].items()} == {
        "question": GENERATION_CHUNKS, "keywords": GENERATION_CHUNKS, "statement": GENERATION_CHUNKS}
    assert check["models"] and all("SmolLM2" in name for name in check["models"])
    assert {row["split"] for row in check["samples"]} <= {"test"} and len(check["samples"]) == figures["kept"]
    assert "rows per chunk" in text and f"the {GENERATION_CHUNKS} chunks of the corpus's test split" in text
    # Cached: the finished folder is reused, not generated again.
    folders = list((tiny_fixture / "work").glob("generation-*"))
    assert len(folders) == 1 and (folders[0] / quality.DONE).exists()


def test_every_step_source_pattern_matches_code():
    """A renamed module would otherwise drop out of its step's cache key silently."""
    for step, patterns in stages.STEP_SOURCES.items():
        for pattern in patterns:
            assert list(stages.PROJECT_ROOT.glob(pattern)), (step, pattern)
    assert stages.source_hash("generate") != stages.source_hash("embed")


def test_make_fixture_keeps_the_needed_columns_sorted_and_counts_them(tiny_fixture):
    frame = pd.read_parquet(tiny_fixture / "fixture.parquet")
    assert tuple(frame.columns) == fixture_module.FIXTURE_COLUMNS
    assert frame.equals(fixture_module.sort_rows(frame))
    assert frame.groupby("split")["chunk_id"].nunique().to_dict() == {"train": TRAIN_CHUNKS, "test": TEST_CHUNKS}
    # Each chunk's rows in the stage's order: question, keywords, statement.
    assert list(frame["query_style"][:3]) == ["question", "keywords", "statement"]
    readme = (tiny_fixture / "README.md").read_text()
    assert f"| train | {TRAIN_CHUNKS} | {3 * TRAIN_CHUNKS} | failed 1, generated {3 * TRAIN_CHUNKS - 1} |" in readme


def test_a_fixture_with_one_question_per_chunk_says_not_in_the_fixture(tiny_fixture):
    frames = fixture_module.read_fixture(tiny_fixture / "fixture.parquet")
    questions = quality.select(frames, quality.ONE)
    assert set(questions["train"]["query_style"]) == {"question"} and quality.has_more_queries(frames)
    assert not quality.has_more_queries(questions)
    metrics = {"384": {"ndcg@10": 0.5}, "64": {"ndcg@10": 0.4}}
    results = {"configs": [{"name": "base", "metrics": metrics, "seconds": 1.0},
                           {"name": "+ 3 queries per chunk", "missing": "not in the fixture"}]}
    assert "+ 3 queries per chunk  not in the fixture" in report.table_text(results)


def test_a_chunk_in_both_splits_is_refused(tmp_path, tiny_fixture):
    frames = fixture_module.read_fixture(tiny_fixture / "fixture.parquet")
    leaked = tmp_path / "leaked"
    leaked.mkdir()
    frames["test"].to_parquet(leaked / "train.parquet", index=False)
    frames["test"].head(0).to_parquet(leaked / "test.parquet", index=False)
    with pytest.raises(Exception, match="both splits"):
        fixture_module.collect([tiny_fixture / "gen-test", leaked])


@pytest.mark.parametrize(("text", "style", "real"), [
    ("How do I install Kubeflow Pipelines?", "question", True),
    ("How do I install Kubeflow Pipelines", "question", False),
    ("kubeflow pipelines install", "keywords", True),
    ("kubeflow", "keywords", False),
    ("install kubeflow pipelines?", "keywords", False),
    ("how to apply the list of", "keywords", False),  # cut off
    ("jupyterlab-native is a new way", "keywords", False),  # a sentence
    ("I want to install Kubeflow Pipelines on my cluster.", "statement", True),
    ("I want to install Kubeflow. It fails.", "statement", False),
    ("I want " + "x" * 105 + ".", "statement", False),  # 110 characters after "I ": cut off by the grammar
    ("I want " + "x" * 104 + ".", "statement", True),
])
def test_real_query_by_style(text, style, real):
    assert real_query(text, style) is real


def test_figures_count_echoes_and_loops_among_kept_rows():
    from components.generate_queries.prompts import example_replies

    looped = "the user is impressed " * 6
    frame = pd.DataFrame({
        "positive": ["How do I run a pipeline?", example_replies()[0], looped, "What is KServe?"],
        "negative": ["How do I delete a pipeline?", "x y", "a b", "What is Katib?"],
        "query_style": ["question"] * 4, "generation_status": ["generated"] * 4,
        "filter_status": ["kept", "kept", "kept", "dropped: roundtrip rank 12"],
        "roundtrip_rank": [1, 2, 3, 12], "similarity-anchor-positive": [0.5, 0.4, 0.3, 0.2],
        "similarity-anchor-negative": [0.4, 0.5, 0.1, 0.1]})
    figures = generation_figures(frame)
    assert figures["kept"] == 3 and figures["counts"]["echoes"] == 1 and figures["counts"]["loops"] == 1
    assert figures["shares"]["roundtrip_top"] == 0.75 and figures["shares"]["positive_beats_negative_valid"] == 0.75


def test_rows_added_for_other_styles_leave_the_one_question_selection_keyed_as_before(tiny_fixture, tmp_path):
    # The stage caches are keyed by the rows a selection reads: adding keyword and statement rows to the fixture
    # must not recompute the one-question configurations (hours on two cores), and changing a row must.
    full = fixture_module.read_fixture(tiny_fixture / "fixture.parquet")
    questions_only = {split: frame[frame["query_style"] == "question"] for split, frame in full.items()}
    one = quality.rows_key(quality.select(full, quality.ONE))
    assert one == quality.rows_key(quality.select(questions_only, quality.ONE))
    assert one == quality.rows_key(quality.select(questions_only, quality.ALL))
    assert one != quality.rows_key(quality.select(full, quality.ALL))
    changed = {split: frame.copy() for split, frame in questions_only.items()}
    changed["train"].iloc[0, changed["train"].columns.get_loc("positive")] = "How do I change one query?"
    assert one != quality.rows_key(quality.select(changed, quality.ONE))
