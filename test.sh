#!/usr/bin/env bash
# Runs every test, on a fresh machine too: first installs (each step only when missing) what
# the tests need beyond a Rust toolchain, then `cargo test --workspace`. Extra arguments go to
# cargo test (`./test.sh on_iggy` runs the Iggy tests only).
#
# Installs: the wasm32-wasip2 target (rustup), Chromium (apt), the Python Iggy SDK
# apache-iggy==0.8.0 and Prometheus's Python client (its text-format parser) (pip), the npm packages in tests/node and plugins/js (npm ci:
# socket.io-client, componentize-js). The Iggy server itself
# is found, not installed: IGGY_SERVER_BIN, ../shared/iggy/iggy-server, or iggy-server on PATH.
#
# A test whose outside part is missing fails and names it. To skip such tests instead, set
# OWLERY_SKIP_IGGY=1, OWLERY_SKIP_BROWSER=1, OWLERY_SKIP_NODE=1 or OWLERY_SKIP_PYTHON=1: the
# tests are then compiled as ignored (cargo's summary counts them) and this script ends with
# a SKIPPED line for each.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '==> %s\n' "$*" >&2; }
skipping() { [ "${1:-}" = "1" ]; }

# Root installs directly; anyone else through sudo when there is one.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        say "need root for: $*"
        return 1
    fi
}

if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx wasm32-wasip2 || {
        say "installing the wasm32-wasip2 target"
        rustup target add wasm32-wasip2
    }
fi

if ! skipping "${OWLERY_SKIP_BROWSER:-}"; then
    if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
        say "installing Chromium (apt), for the live feed page test"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    fi
fi

if ! skipping "${OWLERY_SKIP_PYTHON:-}"; then
    if ! python3 -c 'import prometheus_client' 2>/dev/null; then
        say "installing prometheus-client==0.26.0 (pip), whose parser reads /metrics in a test"
        python3 -m pip install --quiet --disable-pip-version-check prometheus-client==0.26.0
    fi
fi

if ! skipping "${OWLERY_SKIP_PYTHON:-}" && ! skipping "${OWLERY_SKIP_IGGY:-}"; then
    if ! python3 -c 'import apache_iggy' 2>/dev/null; then
        say "installing the Python Iggy SDK (apache-iggy==0.8.0), for the test that publishes with it"
        python3 -m pip install --quiet --disable-pip-version-check apache-iggy==0.8.0
    fi
fi

if ! skipping "${OWLERY_SKIP_NODE:-}"; then
    # npm ci only when the lock file changed since the last install: the test clients
    # (tests/node), and componentize-js for the JavaScript plugins (plugins/js).
    for dir in tests/node plugins/js; do
        if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.package-lock.json"; then
            say "installing the npm packages in $dir (npm ci)"
            (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
        fi
    done
fi

if ! skipping "${OWLERY_SKIP_IGGY:-}"; then
    iggy="${IGGY_SERVER_BIN:-}"
    [ -n "$iggy" ] || { [ -x ../shared/iggy/iggy-server ] && iggy=../shared/iggy/iggy-server; } ||
        iggy="$(command -v iggy-server || true)"
    if [ -z "$iggy" ] || [ ! -x "$iggy" ]; then
        say "no iggy-server: set IGGY_SERVER_BIN, put it at ../shared/iggy/iggy-server or on PATH" \
            "(or OWLERY_SKIP_IGGY=1 to skip the Iggy tests)"
        exit 1
    fi
fi

status=0
if ! skipping "${OWLERY_SKIP_NODE:-}"; then
    # The JavaScript SDK and presence plugin's own logic, in Node against a fake host (the
    # built components run in the real host in cargo's end-to-end tests below).
    (cd plugins/js && npm test --silent) || status=$?
fi
cargo test --workspace --locked "$@" || status=$?

for part in IGGY BROWSER NODE PYTHON; do
    var="OWLERY_SKIP_$part"
    if skipping "${!var:-}"; then
        echo "SKIPPED: the tests that need $part ($var=1); cargo counts them as ignored"
    fi
done
exit "$status"
