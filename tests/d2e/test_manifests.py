"""GitOps manifests: fresh from the KFP compiler, every overlay builds with kustomize and validates."""

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from components.common import IMAGE_VERSION, STAGE_IMAGES
from d2e.manifests import GENERATED_MANIFEST, pipeline_version_name, write_manifests
from d2e.targets import OPENAI_SECRET_NAME
from pipeline import PIPELINE_NAME
from tests.conftest import PROJECT_ROOT

MANIFESTS = PROJECT_ROOT / "manifests"
OVERLAYS = sorted(path for path in (MANIFESTS / "overlays").iterdir() if (path / "kustomization.yaml").exists())
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
KUBECTL = shutil.which("kubectl")


def test_committed_manifests_equal_a_fresh_compile(tmp_path):
    """Like ilab-on-ocp: the committed Pipeline/PipelineVersion must equal a fresh compile (run `make manifests`)."""
    fresh = write_manifests(tmp_path / "pipeline.yaml").read_text()
    committed = GENERATED_MANIFEST.read_text()
    assert list(yaml.safe_load_all(committed)) == list(yaml.safe_load_all(fresh)), (
        "manifests/base/pipeline.yaml is stale: run `make manifests` and commit it")


def test_pipeline_and_version_resources_are_well_formed():
    documents = list(yaml.safe_load_all(GENERATED_MANIFEST.read_text()))
    by_kind = {document["kind"]: document for document in documents}
    assert set(by_kind) == {"Pipeline", "PipelineVersion"}
    for document in documents:
        assert document["apiVersion"] == "pipelines.kubeflow.org/v2beta1"
        assert DNS_1123.match(document["metadata"]["name"]), document["metadata"]["name"]
        assert document["spec"]
    pipeline_name = by_kind["Pipeline"]["metadata"]["name"]
    version = by_kind["PipelineVersion"]
    assert pipeline_name == PIPELINE_NAME
    assert version["spec"]["pipelineName"] == pipeline_name
    # A PipelineVersion is immutable: its name carries the image version, so new images mean a new version.
    assert version["metadata"]["name"] == pipeline_version_name(IMAGE_VERSION)
    assert IMAGE_VERSION.replace(".", "-") in version["metadata"]["name"]
    spec = version["spec"]["pipelineSpec"]
    assert spec["pipelineInfo"]["name"] == PIPELINE_NAME
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    # Every stage's image and no other (the shards' helper tasks run in the images of the stages they serve).
    assert images == set(STAGE_IMAGES.values())
    assert all(image.endswith(f":{IMAGE_VERSION}") for image in images)
    platform = version["spec"]["platformSpec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-generate-queries-component"]["secretAsEnv"][0]["secretName"] == OPENAI_SECRET_NAME


def test_version_names_are_valid_for_git_sha_and_semver():
    assert pipeline_version_name("0.1.0") == "docs-to-embedding-data-v0-1-0"
    assert pipeline_version_name("ABC1234_dirty") == "docs-to-embedding-data-vabc1234-dirty"
    assert DNS_1123.match(pipeline_version_name("1" * 100))


def kustomize(overlay):
    assert KUBECTL, "kubectl is needed for `kubectl kustomize` (see README: Testing)"
    result = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_there_are_at_least_two_environments():
    assert {path.name for path in OVERLAYS} >= {"dev", "prod"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[path.name for path in OVERLAYS])
def test_overlay_builds_validates_and_holds_no_secret(overlay):
    text = kustomize(overlay)
    documents = [document for document in yaml.safe_load_all(text) if document]
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == ["ConfigMap", "Pipeline", "PipelineVersion"]
    namespaces = {document["metadata"]["namespace"] for document in documents}
    assert len(namespaces) == 1 and namespaces != {"kubeflow"}, "an overlay sets its own namespace"
    launcher = next(document for document in documents if document["kind"] == "ConfigMap")
    assert launcher["metadata"]["name"] == "kfp-launcher"
    assert launcher["data"]["defaultPipelineRoot"].startswith("gs://")
    assert "CHANGE-ME" not in launcher["data"]["defaultPipelineRoot"]
    assert "kind: Secret" not in text and not re.search(r"sk-[A-Za-z0-9_-]{10,}|-----BEGIN", text)
    # Built-in kinds against the Kubernetes 1.32 schemas; the KFP custom resources are checked above.
    validate = subprocess.run([sys.executable, "-m", "kubernetes_validate", "-k", "1.32.0", "--strict", "-"],
                              input=text, capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "passed for resource configmap/kfp-launcher" in validate.stdout + validate.stderr


def test_overlays_use_different_namespaces_and_buckets():
    roots, namespaces = set(), set()
    for overlay in OVERLAYS:
        for document in yaml.safe_load_all(kustomize(overlay)):
            namespaces.add(document["metadata"]["namespace"])
            if document["kind"] == "ConfigMap":
                roots.add(document["data"]["defaultPipelineRoot"])
    assert len(roots) == len(namespaces) == len(OVERLAYS)


def test_argocd_applications_point_at_existing_overlays():
    applications = sorted((MANIFESTS / "argocd").glob("*.yaml"))
    assert applications
    for path in applications:
        application = yaml.safe_load(path.read_text())
        assert application["kind"] == "Application"
        source = application["spec"]["source"]["path"]
        assert (PROJECT_ROOT / source / "kustomization.yaml").exists(), source
        built = yaml.safe_load_all(kustomize(PROJECT_ROOT / source))
        assert {d["metadata"]["namespace"] for d in built} == {application["spec"]["destination"]["namespace"]}
