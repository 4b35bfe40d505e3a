#!/usr/bin/env python3
"""The pipeline: documentation chunks -> synthetic query triplets -> scored embedding training data.

One pipeline function serves both targets: `run` executes it locally with kfp.local (each stage a subprocess
running the same code the cluster images run), `compile --target kfp|vertex` writes the YAML for Kubeflow or
Vertex AI, `submit` starts a run there, `manifests` writes the GitOps Pipeline/PipelineVersion.

This file is the pipeline itself; its parameters derive from the stages' settings classes (d2e/parameters.py),
what differs per target is in d2e/targets.py, and the command line in d2e/cli.py.
"""

import sys
from pathlib import Path

from kfp import compiler, dsl

from components.evaluate import evaluate_component, export_model_component
from components.export import export_component
from components.finetune import finetune_component
from components.load_docs import load_docs_component
from components.mine_negatives import mine_negatives_component
from components.publish import publish_component
from components.report import report_component
from d2e.fanout import generate_and_score
from d2e.parameters import pipeline_signature, stage_arguments
from d2e.targets import check_target, configure_task, mount_secrets, request_gpu, secret_arguments

PROJECT_ROOT = Path(__file__).resolve().parent
PIPELINE_NAME = "docs-to-embedding-data"
PIPELINE_DESCRIPTION = ("Turn documentation chunks into scored (anchor, positive, negative) triplets for "
                        "embedding-model training, with distilabel and sentence-transformers.")
DEFAULT_COMPILED = PROJECT_ROOT / "pipeline.yaml"
DEFAULT_VERTEX_COMPILED = PROJECT_ROOT / "pipeline-vertex.yaml"


def add_stages(target: str, values: dict, local: bool = False) -> None:
    """The tasks and their wiring; `values` holds one pipeline parameter per setting, by name. `local`: the build
    that `pipeline.py run` executes (its caching differs: d2e/targets.py)."""
    load = configure_task(load_docs_component(**stage_arguments("load_docs", values)), "load_docs", local)
    # generate_queries and embed_score over `shards` parallel tasks, merged back in load_docs' order (d2e/fanout.py).
    fan_out = generate_and_score(target, values, load.outputs["docs"], local)
    triplets, scored = fan_out.triplets.outputs["triplets"], fan_out.scored.outputs["scored"]

    # Filters and mined negatives: what every later stage reads (rows are marked, none removed).
    mine = mine_negatives_component(scored=scored, embedding_model=values["embedding_model"],
                                    **stage_arguments("mine_negatives", values))
    configure_task(mine, "mine_negatives", local)
    request_gpu(mine, target, values)
    mined = mine.outputs["mined"]

    report = report_component(docs=load.outputs["docs"], triplets=triplets, scored=scored, mined=mined)
    configure_task(report, "report", local)
    final = export_component(scored=mined, report_files=report.outputs["report_files"],
                             **stage_arguments("export", values))
    configure_task(final, "export", local)
    publish = publish_component(scored=mined, report_files=report.outputs["report_files"],
                                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **stage_arguments("publish", values),
                                **secret_arguments(target, "publish", values))
    configure_task(publish, "publish", local)

    # Finetune starts from the embedding model embed_score used; evaluate compares against it.
    tune = finetune_component(scored=mined, embedding_model=values["embedding_model"],
                              **stage_arguments("finetune", values))
    configure_task(tune, "finetune", local)
    request_gpu(tune, target, values)
    # Evaluate encodes the whole corpus twice (base and finetuned): with a large model that wants the GPU too.
    judge = evaluate_component(scored=mined, finetuned_model=tune.outputs["model"],
                               base_model=values["embedding_model"], **stage_arguments("evaluate", values))
    configure_task(judge, "evaluate", local)
    request_gpu(judge, target, values)
    # What evaluate decided, carried out apart from it: the model and the evaluation files leave the artifacts here.
    deliver = export_model_component(evaluation=judge.outputs["evaluation"], finetuned_model=tune.outputs["model"],
                                     output_uri=values["output_uri"], **stage_arguments("export_model", values),
                                     **secret_arguments(target, "export_model", values))
    configure_task(deliver, "export_model", local)
    mount_secrets(target, {"generate_queries": fan_out.generate, "publish": publish, "export_model": deliver})


def build_pipeline(target: str = "kfp", local: bool = False):
    """The one pipeline, with the settings of a target applied: `kfp` (Kubeflow) or `vertex` (Vertex AI); `local`:
    the Kubeflow build with the local run's caching, what `pipeline.py run` executes."""
    check_target(target)
    # KFP reads the parameters from the signature and calls the function positionally in that order.
    signature = pipeline_signature(target)

    def docs_to_embedding_data(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        add_stages(target, bound.arguments, local)

    docs_to_embedding_data.__signature__ = signature
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(docs_to_embedding_data)


# The Kubeflow build (`run` executes the same graph, built with `local=True`).
docs_to_embedding_data = build_pipeline("kfp")


def compile_pipeline(output: Path = DEFAULT_COMPILED, target: str = "kfp") -> Path:
    """Write the pipeline YAML for a target; returns the path."""
    compiler.Compiler().compile(build_pipeline(target), str(output))
    return output


if __name__ == "__main__":
    # The command line imports this module as `pipeline`: reuse this copy rather than building the pipeline twice.
    sys.modules.setdefault("pipeline", sys.modules[__name__])
    from d2e.cli import main

    sys.exit(main())
