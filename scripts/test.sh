#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine, as root:  scripts/test.sh
# Installs what it needs (scripts/install.sh --test), then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k flows -x).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/install.sh --test
# leftovers of an interrupted run: our test namespaces (slot 0, see tests/netns.py) and programs only
for ns in $(ip netns list 2>/dev/null | awk '/^xdpml-test-[0-9]/{print $1}'); do ip netns del "$ns" || true; done
.venv/bin/xdpml cleanup >/dev/null 2>&1 || true
exec .venv/bin/python -m pytest -p no:cacheprovider -q -rfEs "$@"
