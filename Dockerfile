# dsl-dist image. GPU (default): the CUDA builds of torch, fbgemm-gpu and torchrec.
#   docker build -t dsl-dist:0.1.0-cuda .
#   docker build --build-arg VARIANT=cpu -t dsl-dist:0.1.0-cpu .
# The pins live in requirements-*.txt and pyproject.toml (tests/test_packaging.py checks they
# agree). Runs as the unprivileged user `dsl` (uid 1000), as cluster/ expects; wget is for
# KubeRay's health probes.
ARG VARIANT=cuda

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
FROM ubuntu:24.04 AS base-cpu

FROM base-${VARIANT}
ARG VARIANT
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && (id -u 1000 >/dev/null 2>&1 && userdel --remove "$(id -un 1000)" || true) \
    && useradd --create-home --uid 1000 dsl

WORKDIR /app
COPY requirements-common.txt requirements-cpu.txt requirements-cpu-nodeps.txt \
     requirements-cuda.txt ./
RUN pip install -r requirements-${VARIANT}.txt \
    && if [ "${VARIANT}" = cpu ]; then pip install --no-deps -r requirements-cpu-nodeps.txt; fi
COPY pyproject.toml README.md ./
COPY dsl_dist ./dsl_dist
COPY configs ./configs
RUN pip install --no-deps -e . && mkdir -p /app/data /app/runs && chown dsl:dsl /app/data /app/runs

USER 1000
CMD ["python", "-m", "dsl_dist.train", "--help"]
