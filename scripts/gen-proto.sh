#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC modules in xdpml/wire/v1/ from proto/xdpml/wire/v1/*.proto.
#
#   scripts/gen-proto.sh            write into the repository (commit the result)
#   scripts/gen-proto.sh OUTDIR     write into OUTDIR/xdpml/wire/v1/ (tests compare the two)
#
# The generator is grpcio-tools, pinned in pyproject.toml: another version writes
# different files, so tests/export/test_proto_generated.py would fail.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT}
PY=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$OUT/xdpml/wire/v1"
cd "$ROOT/proto"
# Relative paths keep the generated files free of machine-specific absolute paths.
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  $(ls xdpml/wire/v1/*.proto | LC_ALL=C sort)
