"""Checks before a local run starts anything that costs: the values the stages would only reject later.

The settings' ranges are checked when the command line is parsed (`d2e/cli.py`) and again at each stage boundary
(`components.settings.from_arguments`). What a range cannot say is checked here, once, before the local Argilla
starts, outputs are touched or an LLM is called: the LLM spec, the price table and query styles, that a
path-looking dataset or model exists, that every URI has a scheme the stages support, that the output folder can
be one. Each problem is one line naming the flag; all of them are reported together.
"""

import argparse
import os

from components.common import EMBEDDED_EMBEDDING_MODEL, StageError, resolve_embedding_model
from components.embed_backends import install_hint, missing_packages
from components.generate_queries import parse_llm_spec, parse_prices
from components.generate_queries.prompts import parse_styles
from components.load_docs.checks import check_source_exists, expand, is_hub_id, looks_like_path, no_such_path

# Settings that name a folder or object-storage prefix the stages write or read: local paths and gs:// only.
STORAGE_URIS = ("llm_cache_uri", "export_uri", "model_export_uri")
HUB_REPOS = ("hub_repo", "hub_model_repo")
HTTP_URLS = ("llm_base_url", "argilla_url")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def storage_uri_problem(name: str, uri: str) -> str | None:
    """What is wrong with a folder or gs:// URI setting (None: nothing)."""
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        if scheme != "gs":
            return f"{_flag(name)} {uri}: only local folders and gs://BUCKET/PREFIX are supported, not {scheme}://."
        if not rest.split("/")[0]:
            return f"{_flag(name)} {uri}: no bucket name (gs://BUCKET/PREFIX)."
        return None
    if expand(uri).is_file():
        return f"{_flag(name)} {uri} is a file; it must be a folder (or a gs:// prefix)."
    return None


def model_problem(name: str, model: str) -> str | None:
    """What is wrong with an embedding or miner model setting: a missing local path or package."""
    try:
        if model == EMBEDDED_EMBEDDING_MODEL:
            resolve_embedding_model(model)
        elif looks_like_path(model) and not expand(model).exists():
            raise no_such_path(model, _flag(name))
    except StageError as error:
        return str(error)
    return None


def backend_problem(backend: str) -> str | None:
    """Whether the packages of --embedding-backend are installed (the run set leaves the optional ones out)."""
    missing = missing_packages(backend)
    return f"--embedding-backend: {install_hint(backend, missing)}" if missing else None


def output_dir_problem(output_dir: str) -> str | None:
    """Whether --output-dir is, or can become, a writable folder."""
    path = expand(output_dir).absolute()
    if path.exists() and not path.is_dir():
        return f"--output-dir {output_dir} is a file, not a folder."
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        return f"--output-dir {output_dir}: {existing} is a file, not a folder."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output-dir {output_dir}: {existing} is not writable."
    return None


def _value_problems(values: dict) -> list[str]:
    """The problems of the settings' values (only those present: `estimate` has fewer settings)."""
    problems = []
    for check, name in ((parse_llm_spec, "llm"), (parse_prices, "llm_prices"), (parse_styles, "query_styles"),
                        (check_source_exists, "dataset")):
        if values.get(name):
            try:
                check(values[name])
            except (StageError, ValueError) as error:
                named = _flag(name) in str(error) or str(error).startswith("Dataset source")
                problems.append(str(error) if named else f"{_flag(name)}: {error}")
    for name in ("embedding_model", "miner_model"):
        problems.append(model_problem(name, values[name]) if values.get(name) else None)
    if values.get("embedding_backend"):
        problems.append(backend_problem(values["embedding_backend"]))
    for name in STORAGE_URIS:
        problems.append(storage_uri_problem(name, values[name]) if values.get(name) else None)
    for name in HUB_REPOS:
        if values.get(name) and not is_hub_id(values[name]):
            problems.append(f"{_flag(name)} {values[name]!r}: a Hugging Face Hub repo is owner/name.")
    for name in HTTP_URLS:
        if values.get(name) and not values[name].startswith(("http://", "https://")):
            problems.append(f"{_flag(name)} {values[name]!r}: an http:// or https:// URL is needed.")
    return [problem for problem in problems if problem]


def check_run(values: dict, args: argparse.Namespace) -> None:
    """Raise one StageError listing every problem of a local run's settings and flags, before anything starts."""
    problems = _value_problems(values)
    if getattr(args, "output_dir", None) is not None:
        problems.append(output_dir_problem(args.output_dir))
    port = getattr(args, "argilla_port", None)
    if port is not None and not 0 <= port <= 65535:
        problems.append(f"--argilla-port {port}: a port is 0 (any free one) to 65535.")
    problems = [problem for problem in problems if problem]
    if len(problems) == 1:
        raise StageError(problems[0])
    if problems:
        raise StageError(f"{len(problems)} problems, nothing was started:\n  " + "\n  ".join(problems))
