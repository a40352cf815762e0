# The two commands a new user needs:
#   make demo   the whole pipeline on the embedded defaults (synthetic data, 2 local ranks, local MLflow)
#   make test   the test suite (starts a local SLURM cluster and MLflow servers where tests need them)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS="--run-root runs/buckets synth.max_aspect=2 data.bucket_max_ratio=2 model.micro_conditioning=true"
DEMO_ARGS ?=

.PHONY: venv demo test test-fast slurm-up slurm-down bench clean

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(PY) -m latentforge.launch.cli demo $(DEMO_ARGS)

test: venv
	@bash slurm/local/cluster.sh up >/dev/null 2>&1 || echo "[make test] the local SLURM cluster did not start; SLURM tests will say why they skip"
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow and not slurm and not mlflow_server" $(PYTEST_ARGS)

slurm-up:
	bash slurm/local/cluster.sh up

slurm-down:
	bash slurm/local/cluster.sh down

clean:
	rm -rf runs build *.egg-info .pytest_cache
