# `make run` and `make test` each build .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU machines: the local torch 2.13.0 CPU wheel (never torchvision, see README).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m orchestrator.sweep ablation=transfusion_steps

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.metrics_aupro
	$(PY) -m bench.data_loading
	$(PY) -m bench.orchestration
	$(PY) -m bench.diffusionad_paradigms
	$(PY) -m bench.mdps_sampling

clean:
	rm -rf $(VENV) .cache reports/ablations mlruns mlflow.db
