#!/usr/bin/env bash
# Load test of `kaizen serve` on loopback, bounded in count and time: SmolLM2-135M-Instruct
# (Q4_1 GGUF, computed in f32) with four adapters (LoRA q/v, LoRA all-linear, IA3, prefix; see
# common.sh) plus the base model. load_test.py measures every request alone first, then 3
# rounds of 32 concurrent streaming clients (every greedy answer must equal the same request
# run alone; no error; server RSS per round), then 8 concurrent requests vs the same 8 one at a
# time (aggregate decode tokens/s). Then, where LLAMA_CPP_BIN_DIR holds a llama.cpp build with
# llama-server, the same 8 requests (base model only) one at a time and concurrently against
# llama-server, each server alone (kaizen's stopped first): on the f32 GGUF `kaizen export`
# writes from the same weights (cached in $SERVE_WORK), and on the original quantized file;
# llama-server gets 8 slots (-np 8, continuous batching) and the machine's threads, as kaizen.
# Output: scripts/serve/results/load_test.txt (committed).
#   KAIZEN=path/to/kaizen SERVE_MODEL=path/to/model.gguf LLAMA_CPP_BIN_DIR=path/to/llama.cpp/build/bin \
#     bash scripts/serve/load_test.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT="$ROOT/scripts/serve/results/load_test.txt"
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1
echo "kaizen serve load test: $(date -u +%F' '%H:%M) UTC, commit $(git -C "$ROOT" rev-parse --short HEAD), model $(basename "$MODEL"), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
train_adapters
start_server --max-concurrent 32 --max-queue 64 --request-timeout 600
echo "server: $BASE (pid $SERVER_PID, --max-concurrent 32)"
timeout 3000 "$PY" "$ROOT/scripts/serve/load_test.py" --base "$BASE" --pid "$SERVER_PID" ${LOAD_TEST_ARGS:-}
stop_server
if [ -n "${LLAMA_CPP_BIN_DIR:-}" ]; then
  F32="$WORK/$(basename "$MODEL" .gguf).f32.gguf"
  [ -f "$F32" ] || "$K" export --model "$MODEL" --type f32 --out "$F32" > "$WORK/export.log" 2>&1 \
    || { echo "kaizen export failed: $WORK/export.log" >&2; exit 1; }
  for gguf in "$F32" "$MODEL"; do
    echo "load before llama.cpp: $(cut -d' ' -f1-3 /proc/loadavg)"
    start_llama_server "$gguf" -np 8 -c 8192 -t "$(nproc)"
    timeout 1200 "$PY" "$ROOT/scripts/serve/load_test.py" --base "$BASE" --pid "$SERVER_PID" \
      --llamacpp "llama.cpp llama-server on $(basename "$gguf")" ${LOAD_TEST_ARGS:-}
    stop_server
  done
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
