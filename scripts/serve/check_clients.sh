#!/usr/bin/env bash
# Real clients against `kaizen serve`: curl and the official `openai` Python package (pinned in
# requirements.txt), on SmolLM2-135M-Instruct (Q4_1 GGUF) with four adapters trained here for a
# few steps (LoRA on q/v, LoRA on every linear layer, IA3, prefix tuning). The server runs on a
# free loopback port with an API key and is stopped at the end. Greedy answers are compared
# with `kaizen generate --greedy` for the same model, adapter and prompt.
# Output: scripts/serve/results/check_clients.txt (the last run's, committed).
#   KAIZEN=path/to/kaizen SERVE_MODEL=path/to/model.gguf PYTHON=python-with-openai bash scripts/serve/check_clients.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT="$ROOT/scripts/serve/results/check_clients.txt"
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1
"$PY" -c 'import openai' 2>/dev/null || { echo "install the client: pip install -r scripts/serve/requirements.txt" >&2; exit 1; }
echo "kaizen serve client checks: $(date -u +%F) commit $(git -C "$ROOT" rev-parse --short HEAD), model $(basename "$MODEL"), openai $("$PY" -c 'import openai; print(openai.__version__)'), $(curl --version | head -1 | cut -d' ' -f1-2)"
train_adapters
KEY=check-key
start_server --api-key "$KEY" --allow-runtime-adapters --max-concurrent 8
echo "server: $BASE"
FAIL=0
check() { # description, then a command that must succeed
  local what="$1"; shift
  if "$@"; then echo "ok   $what"; else echo "FAIL $what"; FAIL=1; fi
}
status() { # expected status, then curl arguments
  local want="$1"; shift
  local got; got=$(curl -s -o "$WORK/body.json" -w '%{http_code}' "$@")
  [ "$got" = "$want" ] || { echo "  got $got: $(head -c 300 "$WORK/body.json")"; return 1; }
}
AUTH=(-H "Authorization: Bearer $KEY")
JSON=(-H "Content-Type: application/json")

echo "== curl"
check "GET /health 200" status 200 "$BASE/health"
check "GET /v1/models without the key: 401" status 401 "$BASE/v1/models"
check "GET /v1/models lists the base and 4 adapters" status 200 "${AUTH[@]}" "$BASE/v1/models"
check "  ids: $("$PY" -c 'import json,sys; print(",".join(m["id"] for m in json.load(open(sys.argv[1]))["data"]))' "$WORK/body.json")" \
  "$PY" -c 'import json,sys; assert len(json.load(open(sys.argv[1]))["data"]) == 5' "$WORK/body.json"
check "POST /v1/completions (lora-qv, greedy)" status 200 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" \
  -d '{"model": "lora-qv", "prompt": "What color is the sky?", "max_tokens": 16, "temperature": 0}'
echo "  $(cat "$WORK/body.json")"
curl -sN "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/chat/completions" \
  -d '{"model": "ia3", "messages": [{"role": "user", "content": "Add 2 and 3."}], "max_tokens": 8, "temperature": 0, "stream": true}' > "$WORK/stream.txt"
check "POST /v1/chat/completions stream=true (ia3): SSE chunks, then [DONE]" \
  bash -c "grep -q '^data: {' '$WORK/stream.txt' && tail -n 2 '$WORK/stream.txt' | grep -q '^data: \[DONE\]'"
echo "  $(grep -c '^data: ' "$WORK/stream.txt") events; first: $(grep -m1 '^data: ' "$WORK/stream.txt" | head -c 200)"
check "malformed JSON: 400" status 400 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d '{"model":'
echo "  $(cat "$WORK/body.json")"
check "unknown model: 404" status 404 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d '{"model": "nope", "prompt": "a"}'
check "temperature 3: 400" status 400 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d '{"model": "smollm2", "prompt": "a", "temperature": 3}'
echo "  $(cat "$WORK/body.json")"
check "load_lora_adapter (vLLM's body): 200" status 200 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/load_lora_adapter" \
  -d "{\"lora_name\": \"lora-qv-2\", \"lora_path\": \"$WORK/lora-qv\"}"
check "  the new adapter answers" status 200 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d '{"model": "lora-qv-2", "prompt": "Hi", "max_tokens": 4}'
check "unload_lora_adapter: 200" status 200 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/unload_lora_adapter" -d '{"lora_name": "lora-qv-2"}'
check "  then 404" status 404 "${AUTH[@]}" "${JSON[@]}" "$BASE/v1/completions" -d '{"model": "lora-qv-2", "prompt": "Hi"}'

echo "== openai $("$PY" -c 'import openai; print(openai.__version__)') (chat, completions, streaming; greedy vs kaizen generate)"
export BASE KEY K MODEL WORK
"$PY" "$ROOT/scripts/serve/check_clients.py" || FAIL=1
check "GET /metrics" status 200 "$BASE/metrics"
grep -E '^kaizen_(requests_total|generation_tokens_total|decode_steps_total|decode_rows_total)' "$WORK/body.json" | sed 's/^/  /'
stop_server
[ "$FAIL" = 0 ] && echo "all client checks passed" || { echo "SOME CHECKS FAILED"; exit 1; }
