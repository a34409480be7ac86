#!/usr/bin/env bash
# Builds the host and the plugins, puts the plugins (beside their manifests) in ./plugins,
# and serves the demo on http://127.0.0.1:8080. Extra arguments go to `owlery serve`.
set -euo pipefail
cd "$(dirname "$0")"

if command -v rustup >/dev/null; then
    rustup target add wasm32-wasip2 >/dev/null
fi
cargo build --release --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2
for plugin in ws-broadcast analytics alerts; do
    # Copy then rename: the host never sees a half-written plugin.
    cp "plugins/target/wasm32-wasip2/release/${plugin//-/_}.wasm" "plugins/.${plugin}.wasm.tmp"
    mv "plugins/.${plugin}.wasm.tmp" "plugins/${plugin}.wasm"
done
# The JavaScript plugin (presence) too, when npm is there: componentize-js from npm.
# A failure there (no network for npm, say) leaves it out rather than stopping the demo.
if command -v npm >/dev/null; then
    if (cd plugins/js && { cmp -s package-lock.json node_modules/.package-lock.json || npm ci --no-audit --no-fund --loglevel=error; } &&
        node sdk/build.mjs presence/presence.js ../target/wasm32-wasip2/release/presence.wasm); then
        cp plugins/target/wasm32-wasip2/release/presence.wasm plugins/.presence.wasm.tmp
        mv plugins/.presence.wasm.tmp plugins/presence.wasm
    else
        echo "building the JavaScript plugin (presence) failed: it is left out" >&2
    fi
else
    echo "npm not found: the JavaScript plugin (presence) is left out" >&2
fi
cargo build --release --locked -p owlery
echo "Try: examples/publish.sh   and   websocat ws://127.0.0.1:8080/ws?rooms=incident:42" >&2
exec target/release/owlery serve "$@"
