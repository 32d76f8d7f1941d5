# One command sets everything up, one trains, one tests (see README.md).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/movielens/deepfm.yaml

.PHONY: install train test test-fast lint bench clean

install: $(BIN)/rec-dist
	# Headless Chromium for the MLflow UI screenshot test (apt-get as root when missing; else a hint).
	scripts/install_chromium.sh

$(BIN)/rec-dist: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first so pip takes the pinned CPU build; torchrec without its CUDA fbgemm-gpu dependency.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	$(BIN)/pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, '| torchrec', torchrec.__version__)"
	touch $(BIN)/rec-dist

train: install
	$(BIN)/rec-dist data prepare movielens-100k
	$(BIN)/rec-dist fit --config $(CONFIG)

test: install
	$(BIN)/pytest -q

# The quick subset for iterating: everything but the multi-minute README / Ray / Tune / MLflow-server / multi-process runs.
SLOW_TESTS := test_readme.py test_tune.py test_ray_jobs.py test_mlflow_server.py test_torchrec_strategy.py test_model_registry.py test_sharding.py
test-fast: install
	$(BIN)/pytest -q -x $(addprefix --ignore=tests/,$(SLOW_TESTS))

lint: install
	$(BIN)/ruff check rec_dist tests benchmarks jobs

clean:
	rm -rf $(VENV) data mlflow.db mlruns.db mlruns mlartifacts lightning_logs checkpoints
