# syntax=docker/dockerfile:1
# rec_dist training image: the head, the workers and the RayJob submitter of the KubeRay
# cluster (k8s/). Installs the repository the way `make install` does: torch first (the
# pinned build), then the package with exactly one FBGEMM extra, then torchrec without
# its dependencies (its metadata asks for the CUDA fbgemm-gpu and an old torchmetrics).
#
#   docker build --build-arg VARIANT=gpu -t ghcr.io/rec-dist/rec-dist:0.1.0-ray2.60.0-gpu .
#   docker build --build-arg VARIANT=cpu -t ghcr.io/rec-dist/rec-dist:0.1.0-ray2.60.0-cpu .
#
# VARIANT=gpu: torch 2.13.0 from PyPI (CUDA build) + fbgemm-gpu 1.8.0.
# VARIANT=cpu: torch 2.13.0 from the PyTorch CPU index + fbgemm-gpu-cpu 1.8.0.
# Keep TORCH_VERSION / TORCHREC_VERSION / RAY_VERSION equal to pyproject.toml, the Makefile
# and `rayVersion` in k8s/base/raycluster.yaml (tests/test_k8s_manifests_cluster.py checks it).
# For reproducible rebuilds, pin the base image by digest as well (python:3.11.13-slim-bookworm@sha256:...).
FROM python:3.11.13-slim-bookworm

ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
ARG TORCHREC_VERSION=1.8.0
ARG RAY_VERSION=2.60.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG USER_UID=1000

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# wget: KubeRay's head and worker probes call it; bash: KubeRay's container commands.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget bash ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid ${USER_UID} ray \
    && useradd --uid ${USER_UID} --gid ${USER_UID} --create-home --shell /bin/bash ray \
    && python -m venv ${VIRTUAL_ENV}

WORKDIR /app

# Dependencies first (cached while only code changes): the package metadata and sources.
COPY pyproject.toml README.md ./
COPY rec_dist ./rec_dist
RUN set -eux; \
    case "${VARIANT}" in \
      cpu) pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" ;; \
      gpu) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or gpu, got ${VARIANT}" >&2; exit 1 ;; \
    esac; \
    pip install ".[${VARIANT}]" "ray[default]==${RAY_VERSION}"; \
    pip install --no-deps "torchrec==${TORCHREC_VERSION}"; \
    python -c "import torch, fbgemm_gpu, torchrec, ray; print('torch', torch.__version__, '| torchrec', torchrec.__version__, '| ray', ray.__version__)"; \
    test "$(python -c 'import ray; print(ray.__version__)')" = "${RAY_VERSION}"

# What a RayJob runs: entry points, configs, search spaces. /app is the job's working_dir
# (k8s/base/rayjob.yaml), uploaded by the submitter; no .gitignore is copied, so Ray does
# not drop the prepared data below from that upload.
COPY jobs ./jobs
COPY configs ./configs
COPY tune_spaces ./tune_spaces

# MovieLens-100k, prepared at build time so that the smoke job needs no network at run time.
RUN rec-dist data prepare movielens-100k --data_dir /app/data \
    && chown -R ${USER_UID}:${USER_UID} /app/data

USER ${USER_UID}:${USER_UID}
ENV HOME=/home/ray
CMD ["bash"]
