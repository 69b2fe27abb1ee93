# Shared by check_clients.sh and load_test.sh: the binary, the real model, and four small
# adapters trained for a few steps on it (cached in $SERVE_WORK), and starting/stopping a server.
# Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K="${KAIZEN:-$ROOT/target/release/kaizen}"
MODEL="${SERVE_MODEL:-$ROOT/cache/SmolLM2-135M-Instruct.Q4_1.gguf}"
WORK="${SERVE_WORK:-$ROOT/cache/serve}"
PY="${PYTHON:-python3}"
mkdir -p "$WORK"
[ -x "$K" ] || { echo "no kaizen binary at $K: cargo build --release (or set KAIZEN)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "no model at $MODEL: bash scripts/demo.sh --model smollm2 fetches it (or set SERVE_MODEL)" >&2; exit 1; }

# A few dozen instruction pairs: enough for a few steps that make each adapter differ.
train_data() {
  "$PY" - "$WORK/train.jsonl" <<'PY'
import json, sys
colors = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
things = ["apple", "sky", "leaf", "banana", "plum", "carrot", "night", "snow"]
with open(sys.argv[1], "w") as f:
    for i in range(64):
        a, b = i % 8, (i * 3) % 8
        f.write(json.dumps({"instruction": f"What color is the {things[a]}? Answer in one word.",
                            "input": "", "output": colors[a]}) + "\n")
        f.write(json.dumps({"instruction": f"Add {i} and {b}.", "input": "", "output": str(i + b)}) + "\n")
PY
}

# name, then kaizen train flags; trained once (8 steps of batch 4), kept in $WORK/NAME.
adapter() {
  local name="$1"; shift
  [ -f "$WORK/$name/adapter_config.json" ] && return 0
  [ -f "$WORK/train.jsonl" ] || train_data
  "$K" train --model "$MODEL" --data "$WORK/train.jsonl" --out "$WORK/$name" --overwrite \
    --template alpaca --batch-size 4 --max-steps 8 --max-len 64 --seed 1 "$@" \
    > "$WORK/$name.train.log" 2>&1 || { echo "training $name failed: $WORK/$name.train.log" >&2; exit 1; }
}

train_adapters() {
  adapter lora-qv --method lora --r 8 --lora-alpha 16 --target-modules q_proj,v_proj --lr 3e-3
  adapter lora-all --method lora --r 16 --lora-alpha 16 --target-modules all-linear --lr 2e-3
  adapter ia3 --method ia3 --lr 2e-2
  adapter prefix --method prefix --num-virtual-tokens 10 --lr 1e-2
  ADAPTER_FLAGS=(--adapter "lora-qv=$WORK/lora-qv" --adapter "lora-all=$WORK/lora-all"
    --adapter "ia3=$WORK/ia3" --adapter "prefix=$WORK/prefix")
}

# Starts `kaizen serve` on a free loopback port with the given flags; sets SERVER_PID and BASE.
start_server() {
  local log="$WORK/server.log"
  "$K" serve --model "$MODEL" --served-model-name smollm2 --port 0 "${ADAPTER_FLAGS[@]}" "$@" > "$log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$log" 'sed -n "s/^listening on //p" "$log" | head -1'
}

# Starts llama.cpp's llama-server (LLAMA_CPP_BIN_DIR) on GGUF with the given flags, on a free
# loopback port; sets SERVER_PID and BASE once /health answers.
start_llama_server() {
  local log="$WORK/llama-server.log" gguf="$1"; shift
  local port
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$LLAMA_CPP_BIN_DIR/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" "$@" > "$log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$log" "curl -sf http://127.0.0.1:$port/health >/dev/null && echo http://127.0.0.1:$port"
}

# Polls `probe` (a command printing the base URL once the server is up) for a minute.
wait_ready() {
  local log="$1" probe="$2"
  trap stop_server EXIT
  for _ in $(seq 600); do
    BASE=$(eval "$probe" || true)
    [ -n "$BASE" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "the server did not start: $log" >&2; exit 1
}

stop_server() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
}
