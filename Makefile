# One-command setup and test on a fresh CPU machine (see README).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup study demo test test-fast lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/cpu_env_workarounds.sh patches/*.patch
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev,eval]"
	bash scripts/cpu_env_workarounds.sh $(VENV)
	touch $@

# The main job: the accuracy study's reduced grid on the bundled VLM and easy-vqa (prints the answer table).
study: setup
	$(PY) -m vllm_expertflow.eval.sweep --grid reduced --out runs/study-reduced

demo: setup
	$(PY) -m vllm_expertflow.demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not vllm and not cuda"

lint: setup
	$(VENV)/bin/ruff check vllm_expertflow tests benchmarks scripts

bench: setup
	$(PY) benchmarks/offline_throughput.py
