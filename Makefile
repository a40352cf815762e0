# The two commands a new user needs:
#   make demo   the whole pipeline on the embedded defaults (synthetic data, 2 local ranks, local MLflow)
#   make test   the test suite (starts a local SLURM cluster and MLflow servers where tests need them)
# On a machine with a CUDA GPU:
#   make gpu-check   the tiny pipeline end to end on the GPU (docs/gpu.md); GPU_CHECK_ARGS=--dry-run without one
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: venv demo test test-fast gpu-check slurm-up slurm-down bench clean

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(PY) -m latentforge.launch.cli demo

test: venv
	@bash slurm/local/cluster.sh up >/dev/null 2>&1 || echo "[make test] the local SLURM cluster did not start; SLURM tests will say why they skip"
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow and not slurm and not mlflow_server" $(PYTEST_ARGS)

gpu-check: venv
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

slurm-up:
	bash slurm/local/cluster.sh up

slurm-down:
	bash slurm/local/cluster.sh down

clean:
	rm -rf runs build *.egg-info .pytest_cache
