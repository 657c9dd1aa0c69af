#!/usr/bin/env bash
# The demo: sets up the venv and ZooKeeper (as tests/run.sh does), then runs demo/demo.py
# inside a loopback-only network namespace, because the client calls mesh
# names (reviews.default.svc.cluster.local) that must never reach real DNS.
#
#   bash demo/run.sh [--calls N] [--tolerance POINTS]
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../tests/_venv.sh"
cd "$REPO_ROOT"
mp_ensure_venv
mp_ensure_debs "$MP_ZOOKEEPER_DEB"  # the registry step runs Debian's ZooKeeper (as tests/run.sh installs it)

# demo.py stops its own processes (and they die with it); the trap covers an
# interrupt that arrives while it is still starting.
demo_pid=""
cleanup() { if [ -n "$demo_pid" ]; then kill "$demo_pid" 2>/dev/null || true; wait "$demo_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

mp_netns_prefix
"${MP_NETNS[@]}" "$VENV_BIN/python" demo/demo.py "$@" &
demo_pid=$!  # demo.py itself: unshare and sh exec
set +e
wait "$demo_pid"
rc=$?
set -e
demo_pid=""
exit "$rc"
