#!/usr/bin/env bash
# Regenerate the checked-in Python stubs of the wire contract.
#
#   proto/generate.sh            write them next to the .proto files
#   proto/generate.sh OUT_DIR    write them under OUT_DIR instead (used by the
#                                staleness test to compare with the checked-in ones)
#
# Needs grpcio-tools (pip install grpcio-tools). The import root is proto/, so
# the generated modules form the Python package specserve.v1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here}"
mkdir -p "$out"
cd "$here"
"${PYTHON:-python}" -m grpc_tools.protoc -I. \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    specserve/v1/*.proto
