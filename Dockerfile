# xdpml: one image for the node agent and the inference collector.
#
#   docker build -t xdpml:0.1.0 .
#
# Installed by scripts/install.sh --image, the same script the README and CI use:
# Debian's python3-bpfcc (BCC is not on PyPI), Debian's kernel headers as a fallback,
# and a venv (--system-site-packages, so bcc is importable) with xdpml in it.
#
# Users: the collector runs as the non-root user below (the chart enforces it). The
# agent must run as root with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON: it loads BPF
# programs, attaches them to the node's interfaces and, on hosts without kernel
# headers, links the image's headers under /lib/modules at start (see docs/deploy.md).
FROM debian:bookworm-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV XDPML_VENV=/opt/xdpml/.venv \
    XDPML_BPF_DIR=/opt/xdpml/bpf \
    PATH=/opt/xdpml/.venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/xdpml
# What goes in is limited by .dockerignore (no tests, venvs or git history).
COPY . .

RUN scripts/install.sh --image \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 xdpml \
    && useradd --system --uid 10001 --gid xdpml --home-dir /var/lib/xdpml --create-home \
       --shell /usr/sbin/nologin xdpml

USER 10001:10001
ENTRYPOINT ["xdpml"]
CMD ["--help"]
