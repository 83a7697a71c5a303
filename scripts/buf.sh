#!/usr/bin/env bash
# Runs buf (from the npm package @bufbuild/buf, installed once into .tools/) with any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.tools/node_modules/.bin/buf
if [ ! -x "$BUF" ]; then
  command -v npm >/dev/null || { echo "npm is not installed: cannot run buf" >&2; exit 3; }
  npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 >/dev/null
fi
exec "$BUF" "$@"
