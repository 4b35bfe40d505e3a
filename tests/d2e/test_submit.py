"""`pipeline.py submit`: the real Vertex AI and KFP clients, with only the outermost API call replaced."""

import json

import pytest

from components.common import STAGE_IMAGES, STAGES
from d2e.cli import main
from pipeline import PIPELINE_NAME


@pytest.fixture
def service_account_key(tmp_path, monkeypatch):
    """A syntactically real service-account key file (fresh RSA key), so google.auth loads real credentials."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "test-project", "private_key_id": "0", "private_key": pem,
        "client_email": "runner@test-project.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    return path


def test_vertex_submit_builds_the_job_and_replaces_only_the_api_call(service_account_key, monkeypatch, capsys):
    from google.cloud import aiplatform

    submitted = {}

    def fake_submit(job, **kwargs):  # the outermost call: it would create the run on Vertex AI
        submitted["job"], submitted["kwargs"] = job, kwargs

    monkeypatch.setattr(aiplatform.PipelineJob, "submit", fake_submit)
    monkeypatch.setattr(aiplatform.PipelineJob, "resource_name", "projects/test-project/pipelineJobs/x", raising=False)
    code = main([
        "submit", "--target", "vertex", "--project", "test-project", "--region", "europe-west4",
        "--pipeline-root", "gs://bucket/root", "--service-account", "runner@test-project.iam.gserviceaccount.com",
        "--label", "team=docs", "--label", "env=dev", "--param", "limit=5", "--param", "dataset=gs://bucket/chunks",
        "--param", "openai_secret_resource=projects/test-project/secrets/openai-api-key/versions/latest",
        "--display-name", "nightly"])
    assert code == 0, capsys.readouterr().err
    job, kwargs = submitted["job"], submitted["kwargs"]
    assert kwargs["service_account"] == "runner@test-project.iam.gserviceaccount.com"
    request = job._gca_resource
    assert request.display_name == "nightly"
    assert dict(request.labels) == {"team": "docs", "env": "dev"}
    assert request.runtime_config.gcs_output_directory == "gs://bucket/root"
    values = {key: value for key, value in request.runtime_config.parameter_values.items()}
    assert values["limit"] == 5 and values["dataset"] == "gs://bucket/chunks"
    assert values["openai_secret_resource"].endswith("/secrets/openai-api-key/versions/latest")
    # The template is the Vertex compile: the GPU parameters on embed_score (L4 by default), every stage's image.
    from google.protobuf import json_format

    template = json_format.MessageToDict(request._pb.pipeline_spec)
    executors = template["deploymentSpec"]["executors"]
    resources = executors["exec-embed-score-component"]["container"]["resources"]
    assert "vertex_accelerator_type" in resources["accelerator"]["resourceType"]
    assert values.get("vertex_accelerator_type", "NVIDIA_L4") == "NVIDIA_L4"
    assert {e["container"]["image"] for e in executors.values()} == {STAGE_IMAGES[s] for s in STAGES}
    assert template["pipelineInfo"]["name"] == PIPELINE_NAME
    assert "projects/test-project/pipelineJobs/x" in capsys.readouterr().out


def test_vertex_submit_says_what_is_missing(tmp_path, monkeypatch, capsys):
    assert main(["submit", "--target", "vertex", "--project", "p"]) == 2
    assert "--region, --pipeline-root, --service-account" in capsys.readouterr().err
    assert main(["submit", "--target", "vertex", "--project", "p", "--region", "r", "--pipeline-root",
                          "/tmp/x", "--service-account", "s"]) == 2
    assert "gs:// URI" in capsys.readouterr().err
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    assert main(["submit", "--target", "vertex", "--project", "p", "--region", "r", "--pipeline-root",
                          "gs://b/r", "--service-account", "s"]) == 2
    assert "No Google Cloud credentials" in capsys.readouterr().err
    assert main(["submit", "--target", "vertex", "--project", "p", "--region", "r", "--pipeline-root",
                          "gs://b/r", "--service-account", "s", "--param", "novalue"]) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err


def test_vertex_submit_without_the_sdk_says_how_to_install_it(service_account_key, monkeypatch, capsys):
    import sys

    # As after `make run`'s set-up alone: the module cannot be imported (nor found on an already imported parent).
    monkeypatch.setitem(sys.modules, "google.cloud.aiplatform", None)
    monkeypatch.delattr("google.cloud.aiplatform", raising=False)
    assert main(["submit", "--target", "vertex", "--project", "p", "--region", "r", "--pipeline-root",
                 "gs://b/r", "--service-account", "s"]) == 2
    assert "make setup-dev" in capsys.readouterr().err


def test_kfp_submit_needs_a_host(monkeypatch, capsys):
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert main(["submit", "--target", "kfp"]) == 2
    assert "--host" in capsys.readouterr().err
