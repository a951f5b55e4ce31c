# The image the cluster recipes run (clusters/kuberay-*.yaml): CUDA PyTorch + this project
# with its `gpu` extra, at the versions of requirements-gpu.lock.
#
#   docker build -t REGISTRY/diffad-orchestrator:latest .
#
# NOT BUILT HERE: the repository's machines have no Docker daemon and no GPU, so this file is
# only linted (`make lint-docker`, tests/test_packaging.py). Build and smoke-test it on a
# machine with Docker before pushing (docs/cluster.md, "Container image").
#
# Base image: PyTorch's official CUDA *runtime* image for the torch the project pins
# (torch==2.13.0). It brings CUDA, cuDNN, NCCL, a CUDA build of torch 2.13.0 and the
# matching torchvision (0.28.0, the lock's `gpu` extra) in Python 3.11, the Python the lock
# files were resolved for. `runtime`, not `devel`: nothing here compiles CUDA code. The tag
# follows PyTorch's <torch>-cuda<X.Y>-cudnn<N>-runtime naming; that this exact tag exists
# was not checked here (no image registry is reachable). Choose the CUDA version your nodes'
# driver supports with --build-arg BASE_IMAGE=...; the checks below refuse a base image
# whose Python or torch does not match the lock.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# wget: KubeRay's readiness/liveness probes and its RayJob submitter run `wget ... | grep
# success` inside the container. Not version-pinned: the distribution's archive drops old
# versions, so a pin would break the build; wget takes no part in the results.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# Fail early on a base image the lock was not made for (see above).
RUN python -c "import sys, torch; \
assert sys.version_info[:2] == (3, 11), 'the lock is for Python 3.11, not ' + sys.version; \
assert torch.__version__.split('+')[0] == '2.13.0' and torch.version.cuda, 'need a CUDA torch 2.13.0, not ' + torch.__version__"

WORKDIR /opt/diffad-orchestrator

# Dependencies first, in their own layer, so a code change does not reinstall them. The
# lock's torch==2.13.0 and torchvision==0.28.0 are satisfied by the base image's CUDA builds
# (2.13.0+cuXXX matches ==2.13.0), so pip keeps those and installs everything else pinned.
COPY requirements-gpu.lock ./
RUN python -m pip install --no-cache-dir -r requirements-gpu.lock

# The project itself, non-editable (search_spaces/ ships inside the wheel as package data),
# and --no-deps: nothing the lock fixed is resolved again. Then check that no dependency
# swapped the CUDA torch for a CPU one.
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY methods ./methods
COPY search_spaces ./search_spaces
RUN python -m pip install --no-cache-dir --no-deps . \
    && python -c "import torch, torchvision, orchestrator.sweep; assert torch.version.cuda, torch.__version__"

# A non-root user. uid 1000 as in Ray's own images, so files written to a shared volume get
# one owner whichever pod wrote them (the volume must be writable by uid 1000: fsGroup, or
# the NFS export's owner). Pass --build-arg USER_UID=... if the base image already has 1000.
ARG USER_UID=1000
RUN useradd --create-home --uid "${USER_UID}" --shell /bin/bash diffad \
    && mkdir -p /shared/torch_home \
    && chown -R diffad /shared

# torch hub's cache, where the torchvision backbones' ImageNet weight files must be put by
# hand (the project never downloads them: orchestrator/pretrained.py). It lies on the
# /shared mount point, the shared volume every recipe mounts, so the files staged once there
# serve every node; `docker run -v <dir>:/shared` does the same on one machine.
ENV TORCH_HOME=/shared/torch_home
VOLUME ["/shared"]

# No secrets in the image: MLFLOW_TRACKING_URI (and any store credentials) come from the
# cluster recipe's environment at run time. A numeric USER, so that Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd.
USER ${USER_UID}
WORKDIR /home/diffad
CMD ["python", "-m", "orchestrator.sweep", "--help"]
