# syntax=docker/dockerfile:1
# xdpml: two images, each with only what its component imports.
#
#   docker build --target agent     -t xdpml-agent:0.1.0 .
#   docker build --target collector -t xdpml-collector:0.1.0 .
#
# Both install through scripts/install.sh --image TARGET, the script the README and CI
# use. The agent: Debian's python3-bpfcc (BCC is not on PyPI), python3-pyroute2,
# iproute2, Debian's kernel headers as a fallback, and a venv (--system-site-packages,
# so bcc is importable) with xdpml[agent]: no scikit-learn, scipy or pyarrow. The
# collector: a plain venv with xdpml[collector], nothing of BCC.
#
# Users: the agent image runs as root; it needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
# (the chart grants exactly those): it loads BPF programs, attaches them to the node's
# interfaces and, on hosts without kernel headers, links the image's headers under
# /lib/modules at start (docs/deploy.md). The collector image runs as the non-root
# uid 10001.
#
# The cache mounts keep downloaded .deb files, apt lists and pip's cache out of the
# images; apt's are per target, so the two targets build at the same time. scripts/build-rootfs.py builds these same targets without a Docker engine.
FROM debian:bookworm-slim AS base

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV XDPML_VENV=/opt/xdpml/.venv \
    PATH=/opt/xdpml/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/xdpml
# What goes in is limited by .dockerignore (no tests, venvs or git history).
COPY . .

FROM base AS agent
# The loader finds the BPF C sources here (the wheel is installed non-editable).
ENV XDPML_BPF_DIR=/opt/xdpml/bpf
RUN --mount=type=cache,id=apt-archives-agent,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,id=apt-lists-agent,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=cache,id=pip,target=/root/.cache/pip \
    scripts/install.sh --image agent
ENTRYPOINT ["xdpml"]
CMD ["agent", "--help"]

FROM base AS collector
RUN --mount=type=cache,id=apt-archives-collector,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,id=apt-lists-collector,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=cache,id=pip,target=/root/.cache/pip \
    scripts/install.sh --image collector \
    && groupadd --system --gid 10001 xdpml \
    && useradd --system --uid 10001 --gid xdpml --home-dir /var/lib/xdpml --create-home \
       --shell /usr/sbin/nologin xdpml
USER 10001:10001
ENTRYPOINT ["xdpml"]
CMD ["collector", "--help"]
