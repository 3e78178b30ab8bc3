#!/usr/bin/env bash
# The main job on one machine, as root:  scripts/demo.sh
# Installs what it needs, then runs `xdpml demo`: test hosts in network namespaces,
# the agent on their interfaces, the collector with the embedded model, normal
# traffic for the baseline, then a port scan and a SYN flood; prints the flows the
# model flags and ends by itself, removing everything it made.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/install.sh --demo
exec .venv/bin/xdpml demo "$@"
