# pushgate: the entry points a person types. Everything runs from a local
# virtualenv (.venv) that `make` creates; system packages are installed as root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
GENERATED := pushgate_api/auth_pb2.py pushgate_api/auth_pb2_grpc.py \
             pushgate_api/control_pb2.py pushgate_api/control_pb2_grpc.py
PROTOS := protos/auth.proto protos/control.proto

.PHONY: test demo bench lint proto venv clean

# Run every test (creates the virtualenv, installs, generates gRPC code).
test: $(INSTALLED) $(GENERATED)
	$(PY) -m pytest -q tests

# End-to-end demo in network namespaces: not built yet (issue 5).
demo: $(INSTALLED) $(GENERATED)
	@echo "make demo: not built yet; it lands with the Linux client (issue 5)." >&2
	@exit 1

# Microbenchmarks; figures go to stdout.
bench: $(INSTALLED) $(GENERATED)
	$(PY) bench/codec_bench.py

lint: $(INSTALLED) $(GENERATED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Generated code is never edited: change protos/*.proto and run `make proto`.
proto: $(GENERATED)

$(GENERATED) &: $(PROTOS) $(INSTALLED)
	$(PY) -m grpc_tools.protoc -Ipushgate_api=protos \
	    --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

venv: $(INSTALLED)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	    apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }

$(INSTALLED): pyproject.toml $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) $(GENERATED) pushgate_api/*.pyi .pytest_cache .ruff_cache .hypothesis *.egg-info
