"""The command line: `python pipeline.py run|estimate|compile|manifests|submit`.

The flags of `run` and `estimate` that set a pipeline parameter are derived from the stages' settings classes
(`d2e/parameters.py`): `--<name-with-dashes>`, the local default, the help text, the type and the choices all come
from the setting's one declaration. The other flags belong to the local run itself (where outputs go, the local
Argilla) or to the command (compile target, submission).
"""

import argparse
import os
from pathlib import Path

from components.generate_queries import DEFAULT_EXPECTED_COMPLETION_TOKENS
from components.settings import SettingError, SettingSpec, check_value, specs
from components.tracebacks import DEBUG_ENV, debugging
from d2e import parameters
from d2e.errors import report_failure
from d2e.targets import TARGETS

# Hidden aliases: the spelling these flags had before every flag took its setting's name (still accepted).
OLD_FLAGS = {
    "llm_cache_uri": "--llm-cache", "llm_json_mode": "--json-mode", "generation_batch_size": "--batch-size",
    "llm_concurrency": "--concurrency", "llm_request_timeout": "--request-timeout", "llm_max_retries": "--max-retries",
    "llm_use_batch_api": "--batch-api", "llm_batch_max_wait": "--batch-max-wait", "finetune_epochs": "--epochs",
    "finetune_learning_rate": "--learning-rate", "finetune_warmup_ratio": "--warmup-ratio",
    "finetune_hard_negatives": "--hard-negatives", "finetune_seed": "--seed",
}
ESTIMATE_GROUPS = ("load_docs", "generate_queries")
METAVARS = {int: "N", float: "X", str: "TEXT"}
DEBUG_HELP = "on failure, show the full traceback (never local variables; secrets redacted)"


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def describe(spec: SettingSpec) -> str:
    """A setting's help line: its text, the local default and, where it differs, the cluster default."""
    text = f"{spec.help} (default: {_shown(spec.local_default)}"
    if spec.default != spec.local_default:
        text += f"; cluster default: {_shown(spec.default)}"
    return (text + ")").replace("%", "%%")  # argparse formats help strings with %


def add_setting_flag(parser, spec: SettingSpec) -> None:
    """`--name-with-dashes` for one setting; None as the parsed default marks a flag that was not given."""
    options = {"dest": spec.name, "default": None, "help": describe(spec)}
    if spec.type is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options.update(type=spec.type, choices=spec.choices, metavar=None if spec.choices else METAVARS[spec.type])
    parser.add_argument(spec.flag, **options)
    if spec.name in OLD_FLAGS:
        parser.add_argument(OLD_FLAGS[spec.name], **{**options, "help": argparse.SUPPRESS})


def add_setting_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    """One flag per command-line setting of these groups, under a heading per stage."""
    for group, settings_class in parameters.SETTINGS:
        flagged = [spec for spec in specs(settings_class) if spec.cli]
        if group in groups and flagged:
            section = parser.add_argument_group(f"{group} settings")
            for spec in flagged:
                add_setting_flag(section, spec)


def setting_values(args: argparse.Namespace, groups: tuple[str, ...]) -> tuple[dict, set]:
    """(every setting of these groups -> its value, the names given on the command line), range-checked."""
    values, given = {}, set()
    for spec in parameters.group_specs(*groups):
        value = getattr(args, spec.name, None)
        if value is None:
            value = spec.local_default
        else:
            given.add(spec.name)
        try:
            values[spec.name] = check_value(spec, value)
        except SettingError as error:
            raise SettingError(f"{spec.flag}: {error}") from None
    return values, given


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The local run's own flags: where outputs go, the LLM cache switch, the local Argilla."""
    from d2e.local_run import LOCAL_ARGILLA_DATA, LOCAL_ARGILLA_PORT

    run.add_argument("--output-dir", default="outputs", help="where train/test parquet and the report go")
    run.add_argument("--no-llm-cache", action="store_true",
                     help="do not read or write the LLM cache (the task cache is off too: nothing generated is reused)")
    run.add_argument("--no-cache", action="store_true",
                     help="run every stage, even those whose inputs have not changed since an earlier run into "
                          "--output-dir (kfp.local's task cache, OUTPUT_DIR/.kfp/.kfp_cache)")
    run.add_argument("--no-argilla", action="store_true", help="do not publish to Argilla")
    run.add_argument("--argilla-data-dir", default=str(LOCAL_ARGILLA_DATA), help="data folder of the local Argilla")
    run.add_argument("--argilla-port", type=int, default=LOCAL_ARGILLA_PORT,
                     help="port of the local Argilla (0: any free port)")
    run.add_argument("--verbose", action="store_true",
                     help="show the stages' own logs (distilabel, kfp) live; they always go to OUTPUT_DIR/run.log")
    add_setting_flags(run, tuple(parameters.GROUPS))


def add_estimate_arguments(est: argparse.ArgumentParser) -> None:
    """The estimate's flags: the settings of loading and generation, plus how to report."""
    est.add_argument("--no-llm-cache", action="store_true", help="ignore the LLM cache (count every row)")
    est.add_argument("--expected-completion-tokens", type=int, default=DEFAULT_EXPECTED_COMPLETION_TOKENS,
                     help="completion tokens expected per row (two short questions in JSON)")
    est.add_argument("--json", action="store_true", help="also print the estimate as JSON")
    add_setting_flags(est, ESTIMATE_GROUPS)


def add_submit_arguments(sub: argparse.ArgumentParser) -> None:
    """Where to submit: the target, the template and parameters, then each target's own options."""
    sub.add_argument("--target", choices=TARGETS, required=True)
    sub.add_argument("--template", default="", help="a compiled YAML to submit instead of a fresh compile")
    sub.add_argument("--param", action="append", default=[], metavar="K=V",
                     help="pipeline parameter (repeatable); V is parsed as JSON when it can be, else a string")
    sub.add_argument("--display-name", default="", help="run name (default: pipeline name + time)")
    vertex = sub.add_argument_group("vertex")
    vertex.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT", ""))
    vertex.add_argument("--region", default=os.environ.get("GOOGLE_CLOUD_REGION", ""))
    vertex.add_argument("--pipeline-root", default="", help="gs://BUCKET/PATH for the run's artifacts")
    vertex.add_argument("--service-account", default="", help="the identity the run's tasks use")
    vertex.add_argument("--label", action="append", default=[], metavar="K=V", help="run label (repeatable)")
    kfp_group = sub.add_argument_group("kfp")
    kfp_group.add_argument("--host", default=os.environ.get("KFP_HOST", ""), help="KFP API endpoint URL")
    kfp_group.add_argument("--namespace", default="", help="Kubeflow profile namespace")
    kfp_group.add_argument("--experiment", default="", help="KFP experiment name")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    import pipeline
    from d2e.manifests import GENERATED_MANIFEST

    parser = argparse.ArgumentParser(prog="pipeline.py", description=pipeline.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(commands.add_parser("run", help="run the pipeline locally with kfp.local"))
    add_estimate_arguments(commands.add_parser(
        "estimate", help="print the expected generation tokens and cost; calls no LLM"))
    comp = commands.add_parser("compile", help="write the pipeline YAML for Kubeflow or Vertex AI")
    comp.add_argument("--target", choices=TARGETS, default="kfp")
    comp.add_argument("--output", default="", help=f"default: {pipeline.DEFAULT_COMPILED.name} (kfp), "
                      f"{pipeline.DEFAULT_VERTEX_COMPILED.name} (vertex)")
    man = commands.add_parser("manifests", help="write manifests/base/pipeline.yaml (Pipeline + PipelineVersion)")
    man.add_argument("--output", default=str(GENERATED_MANIFEST))
    add_submit_arguments(commands.add_parser("submit", help="compile and start a run on Vertex AI Pipelines or "
                                                            "Kubeflow"))
    for command in commands.choices.values():  # also accepted after the command; SUPPRESS keeps the first one's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; StageError and SettingError reach the caller."""
    import pipeline

    if args.command == "compile":
        default = pipeline.DEFAULT_COMPILED if args.target == "kfp" else pipeline.DEFAULT_VERTEX_COMPILED
        print(f"Wrote {pipeline.compile_pipeline(Path(args.output or default), args.target)}")
        return 0
    if args.command == "manifests":
        from d2e.manifests import write_manifests

        print(f"Wrote {write_manifests(Path(args.output))}")
        return 0
    if args.command == "submit":
        from d2e.submit import submit

        print(f"Submitted {submit(args)}")
        return 0
    if args.command == "estimate":
        from d2e.estimate import estimate

        return estimate(*setting_values(args, ESTIMATE_GROUPS), args)
    from d2e.local_run import run_locally

    return run_locally(*setting_values(args, tuple(parameters.GROUPS)), args)


def main(argv: list[str] | None = None) -> int:
    """Parse and run a command; any failure is one `error:` line (the traceback only with --debug).

    Exit status 2: a problem with the inputs (StageError, SettingError); 1: anything else; 130: Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or debugging()
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the stages of a local run show their tracebacks too
    try:
        return dispatch(args)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure ends as one line
        return report_failure(error, args.command, debug)
