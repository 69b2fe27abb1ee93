#!/usr/bin/env bash
# The page of `kaizen ui` in a real browser: headless Chromium (Debian's package) driven by
# playwright-core (browser_test.js): a tiny run started from the form on a fixture model, its
# curve gaining points, stopped and resumed, a second start refused, runs overlaid, a compare
# report opened, a chat with the base model and the run's adapter. Screenshots go to docs/ui/;
# the last result to scripts/ui/RESULT.md. Not in .ci/run (Chromium alone would take minutes).
#
#   scripts/ui/browser_test.sh            # builds the debug binary; KAIZEN=path/to/kaizen to skip
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/scripts/ui"
if ! command -v chromium >/dev/null; then
    apt-get install -y chromium
fi
if [ ! -d "$HERE/node_modules/playwright-core" ]; then
    (cd "$HERE" && npm ci --no-audit --no-fund)
fi
if [ -z "${KAIZEN:-}" ]; then
    (cd "$ROOT" && cargo build -p kaizen-cli --locked)
    KAIZEN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/kaizen"
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export KAIZEN ROOT OUT SHOTS="$ROOT/docs/ui"
set +e
node "$HERE/browser_test.js" 2>&1 | tee "$OUT/result.txt"
rc=${PIPESTATUS[0]}
set -e
{
    echo "# Last result of scripts/ui/browser_test.sh"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD), $(chromium --version 2>/dev/null | head -1), exit code $rc"
    echo
    echo '```'
    grep -E '^[0-9:]{8} ' "$OUT/result.txt"
    echo '```'
} > "$HERE/RESULT.md"
exit "$rc"
