# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install engine demo test clean

$(VENV)/.installed: pyproject.toml program/native_build.py
	python3 -m venv $(VENV)
	# The CPU build of torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	# llama.cpp built for this CPU's instruction sets, never AMX (program/native_build.py), before
	# the project, so pip never builds it with -march=native or reuses another CPU's wheel.
	$(PY) program/native_build.py install
	$(PY) -m pip install -q -e ".[test,experiments]"
	touch $@

# Every run: a work tree kept on a machine with another CPU gets that CPU's build (a no-op otherwise).
engine: $(VENV)/.installed
	$(PY) program/native_build.py install

install: engine

demo: install
	$(VENV)/bin/personaagent models prepare
	$(VENV)/bin/personaagent demo

test: install
	$(VENV)/bin/personaagent models prepare smollm2-135m
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .demo mlflow.db
