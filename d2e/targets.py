"""What differs between Kubeflow and Vertex AI: the GPU request, where secrets come from, target-only parameters,
and the task settings both share (resources, retries, caching)."""

from dataclasses import dataclass

from kfp import dsl, kubernetes

from components.common import StageError, stage_resources
from components.publish import ARGILLA_API_KEY_ENV, HF_TOKEN_ENV
from components.settings import setting

TARGETS = ("kfp", "vertex")
# Vertex picks the machine from the accelerator and the CPU/memory limits: one L4 + 8 vCPU / 32 GB -> g2-standard-8.
VERTEX_ACCELERATOR = "NVIDIA_L4"
KFP_ACCELERATOR = "nvidia.com/gpu"
# The Kubernetes secrets (Kubeflow) that hold the keys; no value ever becomes a pipeline parameter.
OPENAI_SECRET_NAME = "openai-api-key"
OPENAI_SECRET_KEY = "OPENAI_API_KEY"
ARGILLA_SECRET_NAME = "argilla-api-key"
HF_SECRET_NAME = "hf-token"
# Caching: only stages that are pure functions of their inputs. load_docs may read a Hub id or bucket whose content
# changes under the same name; generate_queries should sample afresh on a re-run (its own row cache, llm_cache_uri,
# reuses finished rows keyed by chunk and LLM settings, which is finer than KFP's task cache); export writes to
# output_uri, a side effect that a cache hit would skip. mine_negatives is deterministic (top-k mining, no sampling).
CACHED_STAGES = frozenset({"embed_score", "mine_negatives", "report"})
# A local run (`pipeline.py run`) caches every stage but these, whose effects lie outside their artifacts (the output
# folder, Argilla, the Hub, a bucket, the exported model): a cache hit would skip the effect. Its dataset is
# fingerprinted (d2e/fingerprint.py), the LLM cache already reuses generations, and sampling afresh is not what an
# identical re-run on a laptop asks for; `--no-cache` runs everything.
UNCACHED_LOCAL_STAGES = frozenset({"export", "publish", "export_model"})
# No task-level retries (`set_retry`): KFP and Vertex retry a failed task whatever made it fail, and cannot tell a
# StageError (a typo, a missing key, the failure-rate gate: the same on every try) from a transient fault by its exit
# code. Retrying those re-ran paid generation three times and hid the message behind 3.5 minutes of backoff.
# Transient faults are retried where they happen, inside the network calls (docs/configuration.md#retries):
# LLM requests (generate_queries/retries.py), the object store, Argilla and the Hub (their clients' retries).
# Parameters that exist on one target only (the rest of the signature is shared).
KFP_ONLY_PARAMETERS = ("gpu_accelerator_type", "gpu_count", "gpu_node_selector", "gpu_tolerations")
VERTEX_ONLY_PARAMETERS = ("vertex_accelerator_type", "vertex_accelerator_count", "openai_secret_resource",
                          "argilla_secret_resource", "hf_secret_resource")


@dataclass(frozen=True)
class Secret:
    """One credential and its two paths into a task's environment variable `env` (the only place a stage reads it):
    Kubeflow mounts the Kubernetes secret `kubernetes_secret` (key `env`); on Vertex the task reads the Secret
    Manager name in the pipeline parameter `parameter` at run time."""

    env: str
    kubernetes_secret: str
    parameter: str
    stages: tuple[str, ...]


SECRETS: tuple[Secret, ...] = (
    Secret(OPENAI_SECRET_KEY, OPENAI_SECRET_NAME, "openai_secret_resource", ("generate_queries",)),
    Secret(ARGILLA_API_KEY_ENV, ARGILLA_SECRET_NAME, "argilla_secret_resource", ("publish",)),
    Secret(HF_TOKEN_ENV, HF_SECRET_NAME, "hf_secret_resource", ("publish", "export_model")),
)


@dataclass(frozen=True)
class TargetSettings:
    """Cluster-only pipeline parameters: the GPU request of each target, the Secret Manager names on Vertex AI.

    A local run has no use for them, so none of them is a `run` flag.
    """

    gpu_accelerator_type: str = setting(KFP_ACCELERATOR, "Kubernetes resource name of the GPU (Kubeflow only)",
                                        cli=False)
    gpu_count: int = setting(1, "GPUs per GPU task (Kubeflow only)", minimum=1, maximum=16, cli=False)
    gpu_node_selector: dict = setting({"nvidia.com/gpu.present": "true"}, "node selector of the GPU tasks "
                                      "(Kubeflow only)", cli=False)
    gpu_tolerations: list = setting([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                    "tolerations of the GPU tasks (Kubeflow only)", cli=False)
    # Vertex picks the machine from these and the CPU/memory limits (stage_resources): check the type and count
    # against the machine types of your region (https://cloud.google.com/vertex-ai/docs/pipelines/machine-types).
    vertex_accelerator_type: str = setting(VERTEX_ACCELERATOR, "Vertex AI accelerator of the GPU tasks, e.g. "
                                           "NVIDIA_L4, NVIDIA_TESLA_T4, NVIDIA_A100_80GB (Vertex only)", cli=False)
    vertex_accelerator_count: int = setting(1, "accelerators per GPU task (Vertex only)", minimum=1, maximum=16,
                                            cli=False)
    openai_secret_resource: str = setting("", "Secret Manager name of the OpenAI key, projects/P/secrets/NAME "
                                          "(Vertex only; Kubeflow mounts the Kubernetes secret instead)", cli=False)
    argilla_secret_resource: str = setting("", "Secret Manager name of the Argilla API key, projects/P/secrets/NAME "
                                           "(Vertex only; Kubeflow mounts the Kubernetes secret instead)", cli=False)
    hf_secret_resource: str = setting("", "Secret Manager name of the Hugging Face token, projects/P/secrets/NAME "
                                      "(Vertex only; Kubeflow mounts the Kubernetes secret instead)", cli=False)


def check_target(target: str) -> str:
    """The target itself, or a StageError naming the known ones."""
    if target not in TARGETS:
        raise StageError(f"Unknown target {target!r}; use one of {', '.join(TARGETS)}.")
    return target


def hidden_parameters(target: str) -> tuple[str, ...]:
    """The parameters the other target has and this one does not show."""
    return VERTEX_ONLY_PARAMETERS if check_target(target) == "kfp" else KFP_ONLY_PARAMETERS


def configure_task(task: dsl.PipelineTask, stage: str, local: bool = False) -> dsl.PipelineTask:
    """Settings every target shares: display name, CPU/memory, caching (no retries: see the note above).

    `local`: the build `pipeline.py run` executes, with the local run's caching (UNCACHED_LOCAL_STAGES)."""
    task.set_display_name(stage)
    resources = stage_resources(stage)
    task.set_cpu_request(resources["cpu_request"]).set_cpu_limit(resources["cpu_limit"])
    task.set_memory_request(resources["memory_request"]).set_memory_limit(resources["memory_limit"])
    task.set_caching_options(stage not in UNCACHED_LOCAL_STAGES if local else stage in CACHED_STAGES)
    return task


def gpu_parameters(target: str) -> tuple[str, str]:
    """The pipeline parameters that name a GPU task's accelerator and count on `target`."""
    return ("gpu_accelerator_type", "gpu_count") if target == "kfp" else ("vertex_accelerator_type",
                                                                            "vertex_accelerator_count")


def request_gpu(task: dsl.PipelineTask, target: str, values: dict) -> None:
    """The same GPU request on every GPU task, from each target's own pipeline parameters (a Kubernetes resource
    name on Kubeflow, an accelerator enum on Vertex): the YAML holds references, the run supplies the values."""
    kind, count = gpu_parameters(target)
    task.set_accelerator_type(values[kind]).set_accelerator_limit(values[count])
    if target == "kfp":
        kubernetes.add_node_selector_json(task, values["gpu_node_selector"])
        kubernetes.add_toleration_json(task, values["gpu_tolerations"])


def secret_arguments(target: str, stage: str, values: dict) -> dict:
    """Extra arguments of a stage's task: on Vertex, the Secret Manager names of the keys it reads at run time."""
    if target != "vertex":
        return {}
    return {secret.parameter: values[secret.parameter] for secret in SECRETS if stage in secret.stages}


def mount_secrets(target: str, tasks: dict[str, dsl.PipelineTask]) -> None:
    """Kubeflow: each key as an env variable from an optional Kubernetes secret (Vertex has none to mount).

    Optional, because the local llama.cpp default and keyless OpenAI-compatible servers need no key, and each
    publishing target is skipped when unconfigured.
    """
    if target != "kfp":
        return
    for secret in SECRETS:
        for stage in secret.stages:
            kubernetes.use_secret_as_env(tasks[stage], secret_name=secret.kubernetes_secret,
                                         secret_key_to_env={secret.env: secret.env}, optional=True)
