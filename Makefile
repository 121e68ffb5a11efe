# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-python builds from source here; skipping the multimodal tool halves the build.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,experiments]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/personaagent models prepare
	$(VENV)/bin/personaagent demo

test: install
	$(VENV)/bin/personaagent models prepare smollm2-135m
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .demo mlflow.db
