"""embed_score's optional CPU backends: the SentenceTransformer exported to ONNX, run by ONNX Runtime or OpenVINO.

sentence-transformers' own `backend="onnx"`/`"openvino"` goes through optimum-onnx / optimum-intel, and no release
of either accepts the project's transformers 5 (optimum-onnx 0.1.0 wants transformers<4.58, optimum-intel 2.2.0
<5.6). So the whole module stack (transformer, pooling, normalisation) is exported here with torch's own ONNX
exporter, and the graph is run with the runtime's Python package alone; tokenising stays the SentenceTransformer's.

The export is cached under a key made of the model's weights and modules, so a model is exported once per machine
and a changed model is exported again; the package or model folder is never written to.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from components.common import StageError, get_logger, load_model, pick_device

log = get_logger("embed_score")
TORCH = "torch"
# What each backend imports (import name -> pip name); onnx is torch's exporter's dependency.
BACKEND_MODULES: dict[str, dict[str, str]] = {
    TORCH: {},
    "onnx": {"onnxruntime": "onnxruntime", "onnx": "onnx"},
    "openvino": {"openvino": "openvino", "onnx": "onnx"},
}
BACKENDS: tuple[str, ...] = tuple(BACKEND_MODULES)
EXPORT_CACHE_ENV = "D2E_EXPORT_CACHE"
# Part of the cache key: bump when the exported graph's inputs, outputs or options change.
EXPORT_FORMAT = "1"
OPSET = 17
ONNX_FILE = "model.onnx"


def missing_packages(backend: str) -> list[str]:
    """The pip names of the backend's packages that are not installed (found without importing them)."""
    return [pip_name for module, pip_name in BACKEND_MODULES.get(backend, {}).items()
            if importlib.util.find_spec(module) is None]


def install_hint(backend: str, missing: list[str]) -> str:
    """The message for a backend whose packages are missing."""
    return (f"embedding_backend={backend!r} needs {', '.join(missing)}, which the local run set (requirements.lock) "
            f"leaves out: pip install {' '.join(missing)} (the versions are pinned in requirements-dev.lock), or use "
            f"embedding_backend='torch'.")


def require_packages(backend: str) -> None:
    """Import the backend's packages; a StageError that says what to pip install when one is missing."""
    missing = []
    for module, pip_name in BACKEND_MODULES[backend].items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise StageError(install_hint(backend, missing))


def export_cache_root() -> Path:
    """Where exported graphs are kept: $D2E_EXPORT_CACHE, else the user's cache folder."""
    if os.environ.get(EXPORT_CACHE_ENV):
        return Path(os.environ[EXPORT_CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "docs-to-embeddings" / "onnx"


def model_key(model) -> str:
    """A digest of what decides the exported graph: weights, modules and their settings, torch, export format."""
    import torch

    digest = hashlib.sha256(f"{EXPORT_FORMAT} {OPSET} {torch.__version__} {model!r} {model.max_seq_length}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]


def traceable(model, names: list[str]):
    """The SentenceTransformer's forward pass from positional tensors, the form torch's exporter traces."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(dict(zip(names, tensors)))["sentence_embedding"]

    return SentenceEmbedding().eval()


def input_names(model) -> list[str]:
    """The tensors the model's own preprocessing hands its first module (input_ids, attention_mask, ...)."""
    import torch

    sample = model.preprocess(["an export sample"])
    return [name for name, value in sample.items() if isinstance(value, torch.Tensor)]


def export_onnx(model, folder: Path) -> Path:
    """Export the SentenceTransformer (on the CPU, fp32) to folder/model.onnx, batch and length dynamic."""
    import torch

    names = input_names(model)
    sample = model.preprocess(["a first export sample", "a second, somewhat longer export sample sentence"])
    axes = {name: {0: "batch", 1: "length"} for name in names} | {"sentence_embedding": {0: "batch"}}
    target = folder / ONNX_FILE
    with warnings.catch_warnings(), torch.inference_mode():
        # The tracer warns about Python conditions on shapes; the tests compare the graph with torch on real rows.
        warnings.simplefilter("ignore")
        torch.onnx.export(traceable(model, names), tuple(sample[name] for name in names), str(target),
                          dynamo=False, input_names=names, output_names=["sentence_embedding"],
                          dynamic_axes=axes, opset_version=OPSET)
    return target


def exported_graph(model) -> tuple[Path, float]:
    """The model's ONNX file, exported now or found in the cache; (its path, seconds the export took, 0 if cached).

    A new export is written to a temporary folder beside its final place and renamed into it, so shards that export
    the same model at once never read a half-written file.
    """
    root = export_cache_root()
    final = root / model_key(model)
    if (final / ONNX_FILE).exists():
        return final / ONNX_FILE, 0.0
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        export_onnx(model, scratch)
        scratch.chmod(0o755)  # mkdtemp's folder is private; the cache may be shared
        try:
            os.replace(scratch, final)
        except OSError:  # another process renamed its export into place first
            if not (final / ONNX_FILE).exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final / ONNX_FILE, time.perf_counter() - started


def onnxruntime_session(path: Path, threads: int) -> tuple[Callable[[dict], Any], str]:
    """ONNX Runtime on the CPU provider; (run feeds -> embeddings, precision)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # As many threads as torch would use (a container's CPU limit, not the host's cores).
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (lambda feeds: session.run(None, feeds)[0]), "fp32"


def openvino_session(path: Path, threads: int) -> tuple[Callable[[dict], Any], str]:
    """OpenVINO on the CPU at its default inference precision (bf16 on CPUs with AVX-512 BF16 or AMX, else fp32)."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads})
    request, output = compiled.create_infer_request(), compiled.output(0)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: '", "").rstrip("'>")
    return (lambda feeds: request.infer(feeds)[output]), precision


class ExportedEncoder:
    """What embed_score uses of a SentenceTransformer (tokenizer, window, dimension, `encode`), with the forward pass
    run from the exported graph. Everything else is the SentenceTransformer's own."""

    def __init__(self, model, run: Callable[[dict], Any], backend: str, precision: str, export_seconds: float):
        self.model, self.run, self.names = model, run, input_names(model)
        self.backend, self.precision, self.export_seconds = backend, precision, export_seconds
        self.device = "cpu"

    def __getattr__(self, name: str):
        return getattr(self.__dict__["model"], name)

    def encode(self, texts: list[str], batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True, show_progress_bar: bool = False):
        """float32 embeddings of `texts`, `batch_size` at a time, in order (as SentenceTransformer.encode)."""
        import numpy as np

        parts = [np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            features = self.model.preprocess(list(texts[start:start + batch_size]))
            parts.append(np.asarray(self.run({name: features[name].numpy() for name in self.names}), np.float32))
        vectors = np.concatenate(parts)
        if normalize_embeddings:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


def load_encoder(model_name: str, device: str = "auto", backend: str = TORCH):
    """The stage's encoder: the SentenceTransformer itself for "torch", else its exported graph on the CPU.

    The exported backends run on the CPU only (their CPU packages are what the images carry). With a GPU present
    and device "auto" they still run on the CPU and say so; a CUDA device named explicitly is refused.
    """
    if backend not in BACKEND_MODULES:
        raise StageError(f"embedding_backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
    if backend == TORCH:
        return load_model(model_name, device)
    require_packages(backend)
    if device != "auto" and device != "cpu":
        raise StageError(f"embedding_backend={backend!r} runs on the CPU only, not on {device!r}; use "
                         "embedding_backend='torch' there (fp16 on CUDA).")
    if pick_device("auto") != "cpu":
        log.warning("embedding_backend=%r runs on the CPU: the GPU of this task is left unused "
                    "(embedding_backend='torch' uses it, in fp16)", backend)
    import torch

    model = load_model(model_name, "cpu")
    path, export_seconds = exported_graph(model)
    session = onnxruntime_session if backend == "onnx" else openvino_session
    run, precision = session(path, torch.get_num_threads())
    log.info("%s backend (%s) on %s%s", backend, precision, path,
             f", exported in {export_seconds:.1f} s" if export_seconds else ", export cached")
    return ExportedEncoder(model, run, backend, precision, export_seconds)
