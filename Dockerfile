# syntax=docker/dockerfile:1
# Imagine Flash service image (multi-stage). See docs/deploy.md.
#
#   docker build -t imagine-flash:cpu .                               # slim CPU image (default)
#   docker build -t imagine-flash:gpu --build-arg VARIANT=gpu .       # NVIDIA CUDA + TensorRT base
#   docker run -p 8000:8000 imagine-flash:cpu                         # serves the baked family
#   docker run -p 8000:8000 -v "$PWD/store:/store:ro" \
#       -e FLASH_MODEL_DIR=/store/shapes64/current imagine-flash:cpu  # serves the model store
#
# The default family (build argument MODEL_DIR, default models/shapes64) is baked in at
# /models/shapes64, which is also the default FLASH_MODEL_DIR: mount another family over it
# (-v /srv/families/mine:/models/shapes64:ro) or point FLASH_MODEL_DIR elsewhere.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.12-py3

# ---- bases: what each variant runs on ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
# The CPU build of torch: PyPI's default Linux wheel is the multi-GB CUDA build.
ENV FLASH_TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" \
    FLASH_VENV_FLAGS="" \
    FLASH_DEVICE=cpu

FROM ${TENSORRT_IMAGE} AS base-gpu
# TensorRT's Python bindings are in the base image's site-packages: the venv must see them.
ENV FLASH_TORCH_INDEX="" \
    FLASH_VENV_FLAGS="--system-site-packages" \
    FLASH_DEVICE=cuda
# (the distribution's current python3-venv matches the base image's python3)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtual environment with torch and the project ---------------------------
# (base-${VARIANT} is one of the stages above, whose images are tagged there)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first and pinned, as the Makefile does; the flags are words on purpose
# hadolint ignore=SC2086
RUN python3 -m venv ${FLASH_VENV_FLAGS} /opt/venv \
    && /opt/venv/bin/pip install ${FLASH_TORCH_INDEX} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY flash/ flash/
COPY distill/ distill/
COPY export/ export/
COPY service/ service/
COPY teacher/ teacher/
RUN /opt/venv/bin/pip install "torch==${TORCH_VERSION}" ".[serve,export]"

# ---- runtime: the venv, the deploy scripts and the baked model family -------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG MODEL_DIR=models/shapes64
ARG UID=10001
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    FLASH_HOST=0.0.0.0 \
    FLASH_PORT=8000 \
    FLASH_MODEL_DIR=/models/shapes64
RUN useradd --system --uid "${UID}" --no-create-home --shell /usr/sbin/nologin flash
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/flash
COPY deploy/ deploy/
COPY ${MODEL_DIR}/ /models/shapes64/
USER ${UID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/flash/deploy/healthcheck.py"]
# SIGTERM drains (in-flight requests finish, up to FLASH_DRAIN_TIMEOUT_S); SIGHUP reloads.
STOPSIGNAL SIGTERM
CMD ["flash", "serve"]
