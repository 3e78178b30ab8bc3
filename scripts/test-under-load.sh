#!/usr/bin/env bash
# The flakiness check: the whole suite N times in a row from a fresh clone, with every CPU
# kept busy by another process, as root.
#
#   scripts/test-under-load.sh [RUNS]      (default 3)
#
# Clones HEAD of this repository into a temporary folder (what CI sees: committed files
# only), starts one busy loop per CPU at normal priority, runs scripts/test.sh there RUNS
# times, and stops the busy loops whatever happens. Exits non-zero if any run failed; the
# logs stay in the printed folder.
set -euo pipefail
RUNS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/xdpml-load.XXXXXX)
chmod 755 "$WORK"  # some tests run the CLI as an unprivileged user
git clone -q "$ROOT" "$WORK/repo"
burners=()
cleanup() { for p in "${burners[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq "$(nproc)"); do (while :; do :; done) & burners+=($!); done
fail=0
for i in $(seq "$RUNS"); do
  start=$(date +%s)
  if (cd "$WORK/repo" && CI=true scripts/test.sh) >"$WORK/run$i.log" 2>&1; then r=passed; else r=FAILED; fail=1; fi
  printf 'run %d/%d: %s in %ds (%s)\n' "$i" "$RUNS" "$r" "$(( $(date +%s) - start ))" \
    "$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$WORK/run$i.log" | tail -n 1)"
done
echo "logs: $WORK"
exit $fail
