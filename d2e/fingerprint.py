"""The fingerprint of what a local run reads besides its settings: what makes kfp.local's task cache safe to use.

kfp.local (2.17) keys a cached task by its component, command and arguments. But `dataset` and the model settings
are paths, that is names: an edited docs folder at the same path would be served the previous run's results. And
the stages import this project's code from PYTHONPATH, outside the command. So `pipeline.py run` fingerprints all of
it and passes the result to load_docs (`inputs_fingerprint`): a different fingerprint re-runs load_docs, whose output
then lies in a new run's folder, which changes the key of every task downstream (they all consume it).

What goes in:
- the dataset: the relative name and the sha256 of the bytes of every file load_docs reads
  (`components.load_docs.source_files`). Bytes rather than size and modification time: an edit that keeps the size
  within the file system's time resolution, or a copy that keeps old times (`cp -p`, `rsync -a`, an archive), is
  still seen; documentation is small (this project's docs hash in milliseconds; 1 GB of parquet about 2 s here).
- the stage code: the bytes of every file under components/ (a few hundred KB).
- local model files (a model folder, a llama.cpp GGUF): name, size and modification time of each file. Weights are
  gigabytes and are written whole, never edited in place at the same size and time.
- the installed packages: each distribution's name and version.

Only a run whose inputs are all on this machine is fingerprinted: a Hub id or gs:// dataset, or a Hub model, can
change under the same name and has no local content to hash, so `fingerprint` returns None and the run keeps the task
cache off (the LLM cache, keyed by chunk and LLM settings, still spares the generation).
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

from components.common import EMBEDDED_EMBEDDING_MODEL
from components.load_docs import source_files

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGE_CODE = PROJECT_ROOT / "components"
LLAMACPP_PREFIX = "llamacpp:"


def _files_below(path: Path) -> list[Path]:
    """The file, or every file below the folder (caches of compiled Python left out), sorted."""
    if path.is_file():
        return [path]
    return sorted(child for child in path.rglob("*") if child.is_file() and "__pycache__" not in child.parts)


def content_digest(files: Iterable[Path], root: Path) -> str:
    """sha256 over each file's name relative to `root` and the sha256 of its bytes."""
    digest = hashlib.sha256()
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                file_digest.update(chunk)
        digest.update(f"{name}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def stat_digest(files: Iterable[Path]) -> str:
    """sha256 over each file's path, size and modification time (for model weights: see the module's note)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def packages_digest() -> str:
    """sha256 over the installed distributions' names and versions."""
    names = sorted(f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions())
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def local_model_files(values: dict) -> Optional[list[Path]]:
    """The files of the run's local models; None when a model is a Hub id (not on this machine)."""
    files: list[Path] = []
    for model in (values["embedding_model"], values["miner_model"]):
        if not model or model == EMBEDDED_EMBEDDING_MODEL:
            continue  # the embedded model is a package: its version is among the packages
        if not Path(model).exists():
            return None
        files += _files_below(Path(model))
    llm = values["llm"]
    if llm.startswith(LLAMACPP_PREFIX) and Path(llm.removeprefix(LLAMACPP_PREFIX)).exists():
        files += _files_below(Path(llm.removeprefix(LLAMACPP_PREFIX)))
    return files


def fingerprint(values: dict) -> Optional[str]:
    """The run's inputs fingerprint (`values`: the local run's settings, paths already absolute), or None when
    something it reads is not on this machine."""
    dataset = source_files(values["dataset"])
    models = local_model_files(values)
    if dataset is None or models is None:
        return None
    root = Path(values["dataset"])
    parts = [content_digest(dataset, root if root.is_dir() else root.parent),
             content_digest(_files_below(STAGE_CODE), STAGE_CODE), stat_digest(models), packages_digest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
