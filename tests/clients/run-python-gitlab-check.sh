#!/usr/bin/env bash
# Runs tests/clients/python_gitlab_check.py (python-gitlab from PyPI) against a
# kas-gateway started here on a free loopback port with a throw-away data dir.
#
#   tests/clients/run-python-gitlab-check.sh        # from the repository root
#
# Environment: VENV (default .venv), GATEWAY_BIN (default target/debug/kas-gateway),
# PYTHON (default python3). Exits with the check script's status.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-.venv}"
GATEWAY_BIN="${GATEWAY_BIN:-target/debug/kas-gateway}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$GATEWAY_BIN" ]]; then
    echo "error: gateway binary $GATEWAY_BIN not found (run cargo build, or set GATEWAY_BIN)" >&2
    exit 2
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
py="$VENV/bin/python"

data_dir="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$data_dir"
}
trap cleanup EXIT

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
token="$("$py" -c 'import secrets; print("glpat-" + secrets.token_urlsafe(24))')"
url="http://127.0.0.1:$port"

KAS_GATEWAY_DATA_DIR="$data_dir" \
KAS_GATEWAY_LISTEN="127.0.0.1:$port" \
KAS_GATEWAY_BOOTSTRAP_TOKEN="$token" \
    "$GATEWAY_BIN" serve >"$data_dir/server.log" 2>&1 &
server_pid=$!

# Wait for readiness (30 s).
if ! "$py" - "$url/-/readiness" "$server_pid" <<'PY'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("gateway exited before becoming ready")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(f"gateway not ready at {url} after 30 s")
PY
then
    echo "--- server log ---" >&2
    cat "$data_dir/server.log" >&2 || true
    exit 1
fi

status=0
KAS_GATEWAY_URL="$url" KAS_GATEWAY_TOKEN="$token" "$py" "$here/python_gitlab_check.py" || status=$?

if [[ $status -ne 0 ]]; then
    echo "--- server log (last 40 lines) ---" >&2
    tail -n 40 "$data_dir/server.log" >&2 || true
fi
exit "$status"
