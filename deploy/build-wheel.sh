#!/bin/sh
# Builds the pushgate wheel (without its dependencies) into $1 from the tree this
# script is in: the gRPC code first (protos/*.proto, as `make proto`), then
# `pip wheel`. The image's build stage runs it on its build context, and
# tests/test_deploy.py on the same selection of files; PYTHON (default python3)
# must have grpcio-tools.
set -eu
out=$(realpath "$1")
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
"$python" -m grpc_tools.protoc -Ipushgate_api=protos \
    --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto
"$python" -m pip wheel --no-cache-dir --no-deps --wheel-dir "$out" .
