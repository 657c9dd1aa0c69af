#!/usr/bin/env bash
# The test command: sets up everything a fresh Debian (Python 3.11, root,
# package registries only) needs, then runs the whole suite against a regular
# (non-editable) install, inside a loopback-only network namespace.
#
#   bash tests/run.sh [extra pytest args]
#   MESHPATCH_VENV=/tmp/ci-venv bash tests/run.sh   # use another venv
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"

# ---------------------------------------------------------------------------
# SERVICE SET-UP (external services the tests need): Debian's zookeeper and
# etcd-server, installed with apt-get (root, quiet, idempotent: skipped when
# already installed; see mp_ensure_debs in _venv.sh).  The servers are
# *started* by the tests themselves on 127.0.0.1, inside the namespace, so only
# installs go here.
setup_services() {
    mp_ensure_debs "$MP_ZOOKEEPER_DEB" "$MP_ETCD_DEB"
}
# ---------------------------------------------------------------------------

mp_ensure_venv
setup_services

log="$(mktemp "${TMPDIR:-/tmp}/meshpatch-pytest.XXXXXX")"
trap 'rm -f "$log"' EXIT

# Soak/scale tests are marked slow and stay out of CI; everything else runs.
# `.venv/bin/pytest` (not `python -m pytest`) so sys.path[0] is the venv's bin
# dir, not the source tree.  (pyproject's pytest `pythonpath = ["."]` still
# puts the source tree first *in the pytest process*, for tests.support;
# processes the tests start run the installed package unless their cwd
# or PYTHONPATH is the source tree.)
export MESHPATCH_TESTS_INSTALLED=1  # tests may check that processes run the installed package
set +e
mp_in_netns "$VENV_BIN/pytest" -q -m "not slow" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

summary="$(grep -E '(passed|failed|errors?|no tests ran|skipped|deselected).* in [0-9.]+s' "$log" | tail -n 1 || true)"
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests; that is a failure here"
fi
# pytest's own summary line goes last, where CI looks for a closing line.
echo "tests/run.sh: pytest exit $rc; summary:"
echo "${summary:-no summary line}"
exit "$rc"
