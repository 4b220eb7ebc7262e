# syntax=docker/dockerfile:1
# The Unidra kubelet plugin. Vendor libraries are optional extras:
#   docker build -t unidra .                          # simulated, sysfs-only vendors (Intel, Gaudi, TPU)
#   docker build --build-arg EXTRAS=nvidia -t unidra .
#   docker build --build-arg EXTRAS=all -t unidra .   # nvidia, amd, furiosa
# What the container needs at run time, and why: docs/install.md ("Privileges").
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY driver ./driver
COPY vendors ./vendors
RUN python -m venv /opt/unidra \
    && /opt/unidra/bin/pip install ".[${EXTRAS}]" \
    && /opt/unidra/bin/unidra --version

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="unidra" \
      org.opencontainers.image.description="One Kubernetes DRA driver for every accelerator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/unidra /opt/unidra
ENV PATH=/opt/unidra/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Runs as uid 0 without capabilities: kubelet's directories on the host are root-owned. The
# DaemonSet drops every capability and mounts the root filesystem read-only.
ENTRYPOINT ["unidra"]
CMD ["kubelet-plugin"]
