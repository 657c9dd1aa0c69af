# Shared set-up for tests/run.sh and demo/run.sh (sourced, not executed).
#
# Why one file: the test suite and the demo must run against the *same* kind
# of install (a regular, non-editable `pip install .`), so packaging mistakes
# show up in both, and both must run inside a loopback-only network namespace
# so made-up mesh hostnames can never leak to a real DNS server.
#
# Inputs (env):
#   MESHPATCH_VENV    venv directory (default: .venv in the repo root)
#   MESHPATCH_PYTHON  interpreter used to create the venv (default: python3.11, else python3)
# Defines: REPO_ROOT, VENV, VENV_BIN, mp_log, mp_ensure_venv, mp_netns_prefix, mp_in_netns.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHPATCH_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
VENV_BIN="$VENV/bin"

mp_log() { printf '[meshpatch-setup] %s\n' "$*" >&2; }

_mp_pick_python() {
    if [ -n "${MESHPATCH_PYTHON:-}" ]; then echo "$MESHPATCH_PYTHON"; return; fi
    if command -v python3.11 >/dev/null 2>&1; then echo python3.11; return; fi
    echo python3
}

# Creating a venv on a bare Debian needs python3-venv (ensurepip); install it
# only when venv creation actually fails and we may use apt-get.
_mp_create_venv() {
    local py; py="$(_mp_pick_python)"
    if "$py" -m venv "$VENV" >/dev/null 2>&1; then return 0; fi
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        mp_log "creating a venv failed; installing python3-venv with apt-get"
        local ver; ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${ver}-venv" >/dev/null 2>&1 \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$py" -m venv "$VENV" && return 0
    fi
    mp_log "cannot create a venv with $py (install python3-venv)"; return 1
}

# Dependencies are (re)installed only when pyproject.toml changed (stamp in the
# venv); the package itself is re-installed on every run, non-editable, so the
# code under test is always the working tree's, packaged as users get it.
mp_ensure_venv() {
    if [ ! -x "$VENV_BIN/python" ]; then
        mp_log "creating venv $VENV"
        _mp_create_venv || return 1
    fi
    local stamp="$VENV/.meshpatch-deps" want
    want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        mp_log "installing dependencies into $VENV"
        _mp_pip install ".[test]" || return 1
        echo "$want" >"$stamp"
    fi
    mp_log "installing meshpatch from $REPO_ROOT (non-editable)"
    _mp_pip install --force-reinstall --no-deps . || return 1
}

# pip is chatty (index warnings, notices); keep its output unless it fails.
_mp_pip() {
    local out rc=0
    out="$(mktemp "${TMPDIR:-/tmp}/meshpatch-pip.XXXXXX")"
    (cd "$REPO_ROOT" && "$VENV_BIN/python" -m pip --disable-pip-version-check -q "$@") >"$out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then cat "$out" >&2; mp_log "pip $* failed (exit $rc)"; fi
    rm -f "$out"
    return "$rc"
}

# Run a command with only a loopback interface: mesh hostnames such as
# reviews.default.svc.cluster.local must never reach a DNS server.  Tries a
# root netns, then a user+net namespace; otherwise warns and runs as is.
_MP_LO_UP='if command -v ip >/dev/null 2>&1; then ip link set lo up; else "$0" -c "
import fcntl, socket, struct
s = socket.socket(); req = struct.pack(\"16sH\", b\"lo\", 0)
flags = struct.unpack(\"16sH\", fcntl.ioctl(s, 0x8913, req))[1]
fcntl.ioctl(s, 0x8914, struct.pack(\"16sH\", b\"lo\", flags | 1))
"; fi'
# Sets MP_NETNS to the command prefix (empty when isolation is impossible), so
# a caller can background "${MP_NETNS[@]}" cmd and get cmd's own pid in $!
# (unshare and sh both exec).
mp_netns_prefix() {
    local py="$VENV_BIN/python"
    if unshare -n true 2>/dev/null; then
        MP_NETNS=(unshare -n sh -c "$_MP_LO_UP"' && shift && exec "$@"' "$py" _)
    elif unshare -rn true 2>/dev/null; then
        MP_NETNS=(unshare -rn sh -c "$_MP_LO_UP"' && shift && exec "$@"' "$py" _)
    else
        mp_log "WARNING: cannot create a loopback-only network namespace (unshare -n not permitted);"
        mp_log "WARNING: running without isolation: mesh hostnames may reach your DNS resolver"
        MP_NETNS=()
    fi
}

mp_in_netns() {
    mp_netns_prefix
    "${MP_NETNS[@]}" "$@"
}

# Debian packages for the registries the tests and the demo start themselves
# (ZooKeeper, etcd).  Installed only when missing (idempotent, quiet); needs
# root and apt-get.  Elsewhere it says what is missing and the tests that need
# it are skipped with that reason; under CI (CI=true) a failed install fails.
#   mp_ensure_debs /usr/share/java/zookeeper.jar=zookeeper /usr/bin/etcd=etcd-server
MP_ZOOKEEPER_DEB="/usr/share/java/zookeeper.jar=zookeeper"
MP_ETCD_DEB="/usr/bin/etcd=etcd-server"
mp_ensure_debs() {
    local missing=() item
    for item in "$@"; do
        [ -e "${item%%=*}" ] || missing+=("${item#*=}")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        mp_log "missing Debian package(s) ${missing[*]} (installing needs root and apt-get); tests that need them are skipped"
        [ "${CI:-}" != "true" ]
        return
    fi
    mp_log "installing ${missing[*]} with apt-get"
    if ! { apt-get update -qq >/dev/null 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }; then
        mp_log "apt-get install ${missing[*]} failed; tests that need them are skipped"
        [ "${CI:-}" != "true" ]
        return
    fi
}
