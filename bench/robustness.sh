#!/usr/bin/env bash
# Issue 6 figures (not in CI): control-plane restart under load, endpoint killed
# under load, 1M-call soak, multi-worker streams and propagation.  Runs in a
# loopback-only network namespace; needs the venv from tests/run.sh (gunicorn
# and uvicorn come with the test extras).  Takes ~20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MESHPATCH_VENV:-.venv}"
PY="$(cd "$VENV/bin" && pwd)/python"
exec unshare -n sh -c "ip link set lo up \
  && $PY bench/bench_cp_restart.py --duration 60 --rate 500 \
  && $PY bench/bench_endpoint_kill.py --duration 30 --rate 500 \
  && $PY bench/bench_multiworker.py --workers 4 8 \
  && $PY bench/bench_soak.py --count 1000000"
