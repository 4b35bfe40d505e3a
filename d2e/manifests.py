"""`pipeline.py manifests`: the KFP compiler's Kubernetes-native Pipeline + PipelineVersion for the kustomize base."""

import re
from pathlib import Path

from kfp import compiler

from components.common import IMAGE_VERSION

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS_DIR = PROJECT_ROOT / "manifests"
GENERATED_MANIFEST = MANIFESTS_DIR / "base" / "pipeline.yaml"
MANIFEST_NAMESPACE = "kubeflow"


def pipeline_version_name(version: str = IMAGE_VERSION) -> str:
    """The PipelineVersion name: from the image version, since a PipelineVersion's spec is immutable."""
    from pipeline import PIPELINE_NAME

    slug = re.sub(r"[^a-z0-9-]+", "-", f"{PIPELINE_NAME}-v{version}".lower()).strip("-")
    return slug[:63].rstrip("-")


def write_manifests(output: Path = GENERATED_MANIFEST) -> Path:
    """Write the Pipeline + PipelineVersion resources (Kubeflow build) to `output`; returns the path."""
    from kfp.compiler.compiler_utils import KubernetesManifestOptions

    from pipeline import PIPELINE_NAME, build_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    options = KubernetesManifestOptions(
        pipeline_name=PIPELINE_NAME, pipeline_version_name=pipeline_version_name(), namespace=MANIFEST_NAMESPACE,
        include_pipeline_manifest=True)
    compiler.Compiler().compile(build_pipeline("kfp"), str(output), kubernetes_manifest_format=True,
                                kubernetes_manifest_options=options)
    return output
