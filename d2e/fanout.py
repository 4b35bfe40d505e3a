"""The fan-out of the pipeline: generate_queries and embed_score over `shards` parallel tasks, then merged.

`shards` is a pipeline parameter, so the graph is the same for every value: a `dsl.ParallelFor` over the list of
shard numbers (one item when shards is 1), and two merges that gather the shards' outputs with `dsl.Collected`
(components/shards.py). Later stages read the merged datasets, so they never see how many shards there were.
"""

import inspect
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl

from components.embed_score import embed_score_component
from components.generate_queries import generate_queries_component
from components.load_docs import load_docs_component
from components.shards import merge_scored_component, merge_triplets_component, shard_list_component
from d2e.parameters import group_specs, stage_arguments
from d2e.targets import configure_task, gpu_parameters, hidden_parameters, request_gpu, secret_arguments

# Bookkeeping tasks around the fan-out: the local run's console does not count them as stages.
HELPER_TASKS = ("shard-list-component", "merge-triplets-component", "merge-scored-component")
# A merge holds every row of a split in memory (as mine_negatives does next): about 2.5 GB per 100,000 rows with
# 1,024-dimensional anchor vectors.
MERGE_MEMORY = "32G"


class FanOut(NamedTuple):
    """The tasks a later stage or setting needs: the merged outputs, and the generation task (for its secret)."""

    generate: dsl.PipelineTask
    triplets: dsl.PipelineTask  # output "triplets"
    scored: dsl.PipelineTask  # output "scored"


def generate_and_score(target: str, values: dict, docs: Any, local: bool = False) -> FanOut:
    """generate_queries then embed_score per shard of `docs`, and the merged triplets and scored datasets (`local`:
    the local run's caching, d2e/targets.py)."""
    shard_list = shard_list_component(shards=values["shards"])
    helper_task(shard_list, "shards", memory="1G")
    with dsl.ParallelFor(items=shard_list.output) as shard:
        generate = generate_queries_component(docs=docs, shard=shard, **stage_arguments("generate_queries", values),
                                              **secret_arguments(target, "generate_queries", values))
        configure_task(generate, "generate_queries", local)
        embed = embed_score_component(triplets=generate.outputs["triplets"], **stage_arguments("embed_score", values))
        configure_task(embed, "embed_score", local)
        request_gpu(embed, target, values)
        # KFP 2.17's compiler does not pass a task's accelerator parameters into its ParallelFor's inputs (the task
        # would not find them at run time); registering them as channels of the task does.
        embed.register_pipeline_channels([values[name] for name in gpu_parameters(target)])
    triplets = merge_triplets_component(parts=dsl.Collected(generate.outputs["triplets"]), docs=docs)
    helper_task(triplets, "merge_triplets", memory=MERGE_MEMORY)
    scored = merge_scored_component(parts=dsl.Collected(embed.outputs["scored"]), docs=docs)
    helper_task(scored, "merge_scored", memory=MERGE_MEMORY)
    return FanOut(generate=generate, triplets=triplets, scored=scored)


def helper_task(task: dsl.PipelineTask, name: str, memory: str) -> dsl.PipelineTask:
    """A bookkeeping task: its name, one CPU, a memory limit, cached (it is a pure function of its inputs)."""
    task.set_display_name(name)
    task.set_cpu_request("0.5").set_cpu_limit("1").set_memory_request("1G").set_memory_limit(memory)
    task.set_caching_options(True)
    return task


def fan_out_pipeline():
    """load_docs and the fan-out alone, as a Kubeflow pipeline: what the shards test and benchmark run locally."""
    hidden = hidden_parameters("kfp")
    signature = inspect.Signature([
        inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=spec.default,
                          annotation=spec.type)
        for spec in group_specs("load_docs", "generate_queries", "embed_score", "target") if spec.name not in hidden])

    def fan_out_only(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        load = load_docs_component(**stage_arguments("load_docs", bound.arguments))
        generate_and_score("kfp", bound.arguments, load.outputs["docs"])

    fan_out_only.__signature__ = signature
    return dsl.pipeline(name="fan-out-only")(fan_out_only)


def run_fan_out_locally(pipeline_root: Path, **arguments) -> Path:
    """Run `fan_out_pipeline` with kfp.local (each task a subprocess); the folder of its merged scored dataset.

    The stages import this project: PYTHONPATH must hold its root (as `pipeline.py run` sets it).
    """
    from d2e.console import kfp_local

    with kfp_local(pipeline_root):
        fan_out_pipeline()(**arguments)
    return next(Path(pipeline_root).glob("*/merge-scored-component/scored"))
