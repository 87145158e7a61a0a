#!/usr/bin/env bash
# Runs the client checks a new user would write, each against its own kas-gateway started here
# on a free loopback port with a throw-away data directory:
#
#   python_gitlab_check.py   python-gitlab from PyPI against the REST API
#   grpc_check.py            grpcio from PyPI, stubs generated from proto/, against the gRPC API
#
#   tests/clients/run-checks.sh [python-gitlab|grpc ...]     # from the repository root
#
# Environment: VENV (default .venv), GATEWAY_BIN (default target/debug/kas-gateway),
# PYTHON (default python3). Exits non-zero if any check failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-.venv}"
GATEWAY_BIN="${GATEWAY_BIN:-target/debug/kas-gateway}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$GATEWAY_BIN" ]]; then
    echo "error: gateway binary $GATEWAY_BIN not found (run cargo build, or set GATEWAY_BIN)" >&2
    exit 2
fi
# Absolute, for the gRPC check, which starts agent-sim with it.
gateway_bin="$(cd "$(dirname "$GATEWAY_BIN")" && pwd)/$(basename "$GATEWAY_BIN")"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements.txt" -r "$here/grpc-requirements.txt"
py="$VENV/bin/python"

data_dir=""
server_pid=""
stop_gateway() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
    [[ -n "$data_dir" ]] && rm -rf "$data_dir"
    data_dir=""
}
trap stop_gateway EXIT

# Starts a gateway with a random root token and GitLab secret; sets url, token, gitlab_secret.
start_gateway() {
    data_dir="$(mktemp -d)"
    local port secret_file
    port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    token="$("$py" -c 'import secrets; print("glpat-" + secrets.token_urlsafe(24))')"
    url="http://127.0.0.1:$port"
    # GitLab's KAS secret file: base64 of 32 random bytes.
    secret_file="$data_dir/gitlab-secret"
    (umask 077 && "$py" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >"$secret_file")
    gitlab_secret="$(cat "$secret_file")"
    KAS_GATEWAY_DATA_DIR="$data_dir" \
    KAS_GATEWAY_LISTEN="127.0.0.1:$port" \
    KAS_GATEWAY_OBSERVABILITY_LISTEN=127.0.0.1:0 \
    KAS_GATEWAY_BOOTSTRAP_TOKEN="$token" \
    KAS_GATEWAY_GITLAB_SECRET_FILE="$secret_file" \
        "$gateway_bin" serve >"$data_dir/server.log" 2>&1 &
    server_pid=$!
    "$py" - "$url/-/readiness" "$server_pid" <<'PY'
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
}

failed=0
for check in "${@:-python-gitlab grpc}"; do
    for name in $check; do
        case "$name" in
            python-gitlab) script="python_gitlab_check.py" ;;
            grpc) script="grpc_check.py" ;;
            *) echo "unknown check $name" >&2; exit 2 ;;
        esac
        status=0
        if start_gateway; then
            KAS_GATEWAY_URL="$url" KAS_GATEWAY_TOKEN="$token" KAS_GATEWAY_GITLAB_SECRET="$gitlab_secret" \
            KAS_GATEWAY_BIN="$gateway_bin" \
                "$py" "$here/$script" || status=$?
        else
            status=1
        fi
        if [[ $status -ne 0 ]]; then
            failed=1
            echo "--- $name: server log (last 40 lines) ---" >&2
            tail -n 40 "$data_dir/server.log" >&2 || true
        fi
        stop_gateway
    done
done
exit "$failed"
