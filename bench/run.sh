#!/usr/bin/env bash
# Runs the benchmarks in a loopback-only network namespace (mesh names can never
# reach a DNS server).  Needs the venv from tests/run.sh or demo/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MESHPATCH_VENV:-.venv}"
exec unshare -n sh -c "ip link set lo up && $VENV/bin/python bench/bench_pick.py && $VENV/bin/python bench/bench_registry_pick.py && $VENV/bin/python bench/bench_telemetry.py && $VENV/bin/python bench/bench_hook_cost.py && $VENV/bin/python bench/bench_bytecodes.py && $VENV/bin/python bench/bench_in_situ.py && $VENV/bin/python bench/bench_overhead.py $*"
