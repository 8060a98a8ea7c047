# Set-up and entry points. `make test` is the README's test command and what CI runs.
# The project-local virtual environment is reused when it exists; torch is only installed
# when the environment has none, so a CUDA build a user put there is never replaced.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.8.0" || $(PY) -m pip install -q triton
	@$(PY) -m pip install -q -e ".[test,plot]"

test: venv
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# The main job (README): the whole fusion pipeline on a built-in default, cached under
# runs/fuse/<preset>; FUSE_ARGS passes options, e.g. FUSE_ARGS="--preset reference".
FUSE_ARGS ?=
.PHONY: fuse

fuse: venv
	$(PY) -m fusellm_kernels.cli fuse $(FUSE_ARGS)
