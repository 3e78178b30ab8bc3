#!/usr/bin/env bash
# mypy over the xdpml namespace as it is installed.
#
# agent/ and collector/ are the packages xdpml.agent and xdpml.collector (pyproject.toml
# package-dir), a mapping mypy cannot follow by itself; so a throwaway tree of symlinks
# presents them in place, and the paths in mypy's messages are turned back into the
# repository's. Arguments go to mypy (default: -p xdpml, everything).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir "$T/xdpml"
for e in "$ROOT"/xdpml/*; do ln -s "$e" "$T/xdpml/$(basename "$e")"; done
ln -s "$ROOT/agent" "$T/xdpml/agent"
ln -s "$ROOT/collector" "$T/xdpml/collector"
cd "$T"
set +e
[ $# -gt 0 ] || set -- -p xdpml
"$PY" -m mypy --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" "$@" >"$T/out" 2>&1
rc=$?
set -e
sed -e 's#^xdpml/agent/#agent/#' -e 's#^xdpml/collector/#collector/#' "$T/out"
exit $rc
