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
# The Kubernetes secret that holds the OpenAI key; its value never becomes a pipeline parameter.
OPENAI_SECRET_NAME = "openai-api-key"
OPENAI_SECRET_KEY = "OPENAI_API_KEY"
# Publishing secrets, likewise only env variables from optional Kubernetes secrets.
ARGILLA_SECRET_NAME = "argilla-api-key"
HF_SECRET_NAME = "hf-token"
# Caching: only stages that are pure functions of their inputs. load_docs may read a Hub id or bucket whose content
# changes under the same name; generate_queries should sample afresh on a re-run (its own row cache, llm_cache_uri,
# reuses finished rows keyed by chunk and LLM settings, which is finer than KFP's task cache); export writes to
# output_uri, a side effect that a cache hit would skip. mine_negatives is deterministic (top-k mining, no sampling).
CACHED_STAGES = frozenset({"embed_score", "mine_negatives", "report"})
# No task-level retries (`set_retry`): KFP and Vertex retry a failed task whatever made it fail, and cannot tell a
# StageError (a typo, a missing key, the failure-rate gate: the same on every try) from a transient fault by its exit
# code. Retrying those re-ran paid generation three times and hid the message behind 3.5 minutes of backoff.
# Transient faults are retried where they happen, inside the network calls (docs/configuration.md#retries):
# LLM requests (generate_queries/retries.py), the object store, Argilla and the Hub (their clients' retries).
# Parameters that exist on one target only (the rest of the signature is shared).
KFP_ONLY_PARAMETERS = ("gpu_accelerator_type", "gpu_count", "gpu_node_selector", "gpu_tolerations")
VERTEX_ONLY_PARAMETERS = ("openai_secret_resource",)


@dataclass(frozen=True)
class TargetSettings:
    """Cluster-only pipeline parameters: the GPU request on Kubeflow, the OpenAI key's secret on Vertex AI.

    A local run has no use for them, so none of them is a `run` flag.
    """

    gpu_accelerator_type: str = setting(KFP_ACCELERATOR, "Kubernetes resource name of the GPU (Kubeflow only)",
                                        cli=False)
    gpu_count: int = setting(1, "GPUs per GPU task (Kubeflow only)", minimum=1, cli=False)
    gpu_node_selector: dict = setting({"nvidia.com/gpu.present": "true"}, "node selector of the GPU tasks "
                                      "(Kubeflow only)", cli=False)
    gpu_tolerations: list = setting([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                    "tolerations of the GPU tasks (Kubeflow only)", cli=False)
    openai_secret_resource: str = setting("", "Secret Manager name of the OpenAI key, projects/P/secrets/NAME "
                                          "(Vertex only; Kubeflow mounts the Kubernetes secret instead)", cli=False)


def check_target(target: str) -> str:
    """The target itself, or a StageError naming the known ones."""
    if target not in TARGETS:
        raise StageError(f"Unknown target {target!r}; use one of {', '.join(TARGETS)}.")
    return target


def hidden_parameters(target: str) -> tuple[str, ...]:
    """The parameters the other target has and this one does not show."""
    return VERTEX_ONLY_PARAMETERS if check_target(target) == "kfp" else KFP_ONLY_PARAMETERS


def configure_task(task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
    """Settings every target shares: display name, CPU/memory, caching (no retries: see the note above)."""
    task.set_display_name(stage)
    resources = stage_resources(stage)
    task.set_cpu_request(resources["cpu_request"]).set_cpu_limit(resources["cpu_limit"])
    task.set_memory_request(resources["memory_request"]).set_memory_limit(resources["memory_limit"])
    task.set_caching_options(stage in CACHED_STAGES)
    return task


def request_gpu(task: dsl.PipelineTask, target: str, values: dict) -> None:
    """The same GPU request on every GPU task: parameters on Kubeflow, a fixed accelerator on Vertex."""
    if target == "kfp":
        task.set_accelerator_type(values["gpu_accelerator_type"]).set_accelerator_limit(values["gpu_count"])
        kubernetes.add_node_selector_json(task, values["gpu_node_selector"])
        kubernetes.add_toleration_json(task, values["gpu_tolerations"])
    else:
        task.set_accelerator_type(VERTEX_ACCELERATOR).set_accelerator_limit(1)


def generation_secret_arguments(target: str, values: dict) -> dict:
    """Extra arguments of the generation task: on Vertex, the Secret Manager name it reads the key from."""
    return {"openai_secret_resource": values["openai_secret_resource"]} if target == "vertex" else {}


def mount_secrets(target: str, generate: dsl.PipelineTask, publish: dsl.PipelineTask,
                  evaluate: dsl.PipelineTask) -> None:
    """Kubeflow: each key as an env variable from an optional Kubernetes secret (Vertex has none to mount).

    Optional, because the local llama.cpp default and keyless OpenAI-compatible servers need no key, and each
    publishing target is skipped when unconfigured.
    """
    if target != "kfp":
        return
    kubernetes.use_secret_as_env(generate, secret_name=OPENAI_SECRET_NAME,
                                 secret_key_to_env={OPENAI_SECRET_KEY: "OPENAI_API_KEY"}, optional=True)
    kubernetes.use_secret_as_env(publish, secret_name=ARGILLA_SECRET_NAME,
                                 secret_key_to_env={ARGILLA_API_KEY_ENV: ARGILLA_API_KEY_ENV}, optional=True)
    for task in (publish, evaluate):
        kubernetes.use_secret_as_env(task, secret_name=HF_SECRET_NAME,
                                     secret_key_to_env={HF_TOKEN_ENV: HF_TOKEN_ENV}, optional=True)
