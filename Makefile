# pushgate: the entry points a person types. Everything runs from a local
# virtualenv (.venv) that `make` creates; system packages are installed as root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
GENERATED := pushgate_api/auth_pb2.py pushgate_api/auth_pb2_grpc.py \
             pushgate_api/admin_pb2.py pushgate_api/admin_pb2_grpc.py \
             pushgate_api/control_pb2.py pushgate_api/control_pb2_grpc.py
PROTOS := protos/auth.proto protos/control.proto protos/admin.proto

# Debian packages the tests and the demo use (network namespaces, ping, NAT, iperf3;
# gcc builds the fake wintun.dll and, with libssl-dev, the compiled packet cipher
# (push_protocol/_codec.c, setup.py), binutils' objdump is PyInstaller's; setcap, setpriv,
# unshare, strace, Debian's python3 with venv and systemd-analyze for
# tests/test_deploy.py's image and unit checks; Alertmanager and amtool for its alert
# delivery test; PostgreSQL's server for the shared-store tests, which start their own
# in a temporary directory: netlab/postgres.py).
SYSTEM_TOOLS := ip ping nft iperf3 curl promtool prometheus prometheus-node-exporter docker-compose \
                gcc objdump setcap setpriv unshare strace systemd-analyze \
                prometheus-alertmanager amtool pg_ctlcluster
SYSTEM_PACKAGES := iproute2 iputils-ping nftables iperf3 curl procps prometheus \
                   prometheus-node-exporter prometheus-alertmanager docker-compose gcc \
                   libc6-dev libssl-dev binutils \
                   libcap2-bin util-linux strace python3-venv systemd postgresql

# The one-file client executable and the signed WinTun DLL it bundles.
CLIENT_EXE := dist/pushgate-client
WINTUN_DLL := build/wintun/amd64/wintun.dll
CLIENT_SOURCES := $(wildcard client/*.py push_protocol/*.py pushgate_io/*.py) \
                  release/pushgate-client.spec release/client_main.py

.PHONY: test test-fast demo bench bench-vpn soak fuzz lint proto venv system-deps deploy-check clean \
        log-audit \
        client-exe windows-wheels

# Run every test (creates the virtualenv, installs, generates gRPC code, builds the
# client executable, which tests/test_client_exe.py runs).
test: system-deps $(INSTALLED) $(GENERATED) $(CLIENT_EXE)
	$(PY) -m pytest -q tests

# The fast tier: every test not marked netns (needs root) or processes (starts a
# pushgate-auth), without privileges, in well under a minute. Started as root, it keeps uid 0 but holds no capability at all (empty
# bounding set, no_new_privs): namespaces, TUN, nftables, BPF and switching users
# fail, so a test that needs them and is not marked fails, and one that builds a
# netlab.Lab or a netlab.auth.AuthServer says which marker it lacks. (Not `nobody`:
# the virtualenv's interpreter may live under /root, which nobody cannot reach.)
FAST_TIER_ENV := PUSHGATE_FAST_TIER=1
FAST_TIER_PYTEST := $(PY) -m pytest -q -m "not netns and not processes" tests
UNPRIVILEGED := setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs

test-fast: $(INSTALLED) $(GENERATED)
	env $(FAST_TIER_ENV) $$([ "$$(id -u)" = 0 ] && echo $(UNPRIVILEGED)) $(FAST_TIER_PYTEST)

# The one-file client: pushgate-client here, pushgate-client.exe on Windows (the
# workflow .github/workflows/windows-client.yml runs the same two steps there).
client-exe: $(CLIENT_EXE)

$(CLIENT_EXE): $(CLIENT_SOURCES) $(GENERATED) $(WINTUN_DLL) $(INSTALLED)
	$(PY) -m PyInstaller --noconfirm --log-level WARN --distpath dist \
	    --workpath build/pyinstaller release/pushgate-client.spec

# Never committed: fetched from PyPI (pytun-pmd3 wheel) and checked against its pin.
$(WINTUN_DLL): release/wintun_dll.py | $(INSTALLED)
	$(PY) release/wintun_dll.py fetch --dest build/wintun

# Every dependency resolves to Windows wheels (also run by tests/test_windows_ci.py).
windows-wheels: $(INSTALLED)
	$(PY) release/windows_wheels.py

# The deploy stack checked with docker-compose, promtool, amtool and a live Prometheus
# and Alertmanager (alert delivery end to end, every dashboard query answering); the
# Kubernetes manifests against the Kubernetes schema, offline (kubernetes-validate).
deploy-check: system-deps $(INSTALLED) $(GENERATED)
	$(PY) -m pytest -q tests/test_deploy.py tests/test_kubernetes.py

# The end-to-end suite with both services at debug level, in JSON; then every log it
# left is searched for the password and private keys, and checked against the schema.
LOG_AUDIT_DIR := build/log-audit
log-audit: system-deps $(INSTALLED) $(GENERATED)
	rm -rf $(LOG_AUDIT_DIR) && mkdir -p $(dir $(LOG_AUDIT_DIR))
	PUSHGATE_SERVICE_LOG_FLAGS="--log-level debug --log-format json" $(PY) -m pytest -q \
	    -p no:cacheprovider --basetemp=$(LOG_AUDIT_DIR) tests/test_e2e.py
	$(PY) -m netlab.log_audit $(LOG_AUDIT_DIR)

# The whole gateway on this host in network namespaces, with traffic through it.
demo: system-deps $(INSTALLED) $(GENERATED)
	$(PY) -m netlab.demo

# Installs only what is missing (needs root, as CI and the demo do anyway).
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing=1; \
	test -f /usr/include/openssl/evp.h || missing=1; \
	if [ -n "$$missing" ]; then \
	    echo "installing $(SYSTEM_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi

# Benchmarks; figures go to stdout (compare figures from one run, as ratios): codec,
# login latency, auth memory under failed logins, dataplane packets/CPU-second and
# memory/session, what a noise flood costs a TCP stream, then pushgate beside
# wireguard-go and OpenVPN (and beside itself on its pure-Python hot path). The
# Python benches measure the compiled hot path and the pure-Python reference side
# by side (bench/implementations.py).
# The side-by-side VPN run uses the team's harness in ../shared/bench; its results
# are kept in bench/results/ and compared with the run before.
BENCH_HARNESS := ../shared/bench/netns-tunnels.sh
BENCH_REPEATS ?= 3
BENCH_PACKAGES := wireguard-go wireguard-tools openvpn openssl iperf3

# Every table is printed after the machine it ran on (bench/machine.py): figures from
# different machines are never compared, only ratios within one run.
BENCH_PY := PYTHONPATH=. $(PY) bench/machine.py --header && PYTHONPATH=. $(PY)

bench: system-deps $(INSTALLED) $(GENERATED)
	$(PY) -m pip install -q -e '.[bench]'
	mkdir -p bench/results
	PYTHONPATH=. $(PY) bench/machine.py
	$(BENCH_PY) bench/codec_bench.py
	$(BENCH_PY) bench/login_bench.py
	$(BENCH_PY) bench/store_scale_bench.py
	$(BENCH_PY) bench/failover_bench.py
	$(BENCH_PY) bench/idle_latency_bench.py
	$(BENCH_PY) bench/throttle_memory_bench.py
	$(BENCH_PY) bench/dataplane_bench.py
	$(BENCH_PY) bench/receive_path_bench.py
	$(BENCH_PY) bench/policy_bench.py
	$(BENCH_PY) bench/noise_bench.py --results bench/results/noise-last.txt
	$(BENCH_PY) bench/direction_bench.py --results bench/results/direction-last.txt
	$(BENCH_PY) bench/fairness_bench.py --results bench/results/fairness-last.txt
	$(MAKE) --no-print-directory bench-vpn

bench-vpn: system-deps $(INSTALLED) $(GENERATED)
	@command -v wireguard-go >/dev/null && command -v openvpn >/dev/null || { \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(BENCH_PACKAGES) >/dev/null; }
	@test -f $(BENCH_HARNESS) || { echo "bench-vpn needs $(BENCH_HARNESS)" >&2; exit 1; }
	mkdir -p bench/results
	@if [ -f bench/results/vpn-last.txt ]; then cp bench/results/vpn-last.txt bench/results/vpn-previous.txt; fi
	bash $(BENCH_HARNESS) -t 5 -r $(BENCH_REPEATS) --extra pushgate=bench/pushgate-hook.sh \
	    --extra pushgate-python=bench/pushgate-python-hook.sh \
	    > bench/results/vpn-last.txt
	PYTHONPATH=. $(PY) bench/machine.py --header
	$(PY) bench/vpn_table.py bench/results/vpn-last.txt \
	    $$(test -f bench/results/vpn-previous.txt && echo bench/results/vpn-previous.txt)

# The hostile suite (tests/test_hostile.py) for longer: every timed scenario runs at
# least SOAK_SECONDS; figures are appended to bench/results/soak.jsonl.
SOAK_SECONDS ?= 60
soak: system-deps $(INSTALLED) $(GENERATED)
	mkdir -p bench/results
	PUSHGATE_SOAK_SECONDS=$(SOAK_SECONDS) PUSHGATE_RESULTS=bench/results/soak.jsonl \
	    $(PY) -m pytest -q -s -p no:cacheprovider tests/test_hostile.py

# Coverage-guided fuzzing of the receive path; the corpus in fuzz/corpus/ grows.
FUZZ_SECONDS ?= 60
fuzz: $(INSTALLED) $(GENERATED)
	$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install -q "atheris>=2.3,<4"
	PYTHONPATH=. $(PY) fuzz/fuzz_receive.py fuzz/corpus -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=fuzz/

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

# The editable install also builds the C parts in place (setup.py).
$(INSTALLED): pyproject.toml setup.py push_protocol/_codec.c pushgate_io/_offload.c $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,client-exe]'
	touch $@

clean:
	rm -rf $(VENV) $(GENERATED) pushgate_api/*.pyi .pytest_cache .ruff_cache .hypothesis *.egg-info \
	    build dist
