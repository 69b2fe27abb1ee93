#!/usr/bin/env bash
# `kaizen compare` on real data: SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI), the Japanese
# man-page instruction pairs from Debian's manpages-ja as the task (as in scripts/demo.sh), and
# English public-domain prose (botchan.txt, ~40 chunks of the novel) as the general text that
# forgetting is measured on. Full and freeze tuning and every PEFT method `kaizen compare` knows (LoRA with
# its PiSSA and OLoRA inits among them), one after the other: about 45 minutes on 2 CPU cores. Writes $OUT/report.md, report.json, charts and one run
# directory per method.
#
#   bash scripts/compare.sh [extra kaizen compare flags, e.g. --overwrite]
#   COMPARE_METHODS=lora,prompt COMPARE_STEPS=2 bash scripts/compare.sh     # a quick check
#   COMPARE_MODEL=gemma3 bash scripts/compare.sh     # on Gemma 3 270M base (the demo's model;
#                                                    # question and answer as plain text)
#
# Environment: COMPARE_MODEL (smollm2 or gemma3, default smollm2), KAIZEN_CACHE (default cache),
# COMPARE_OUT (default $KAIZEN_CACHE/runs/compare),
# COMPARE_METHODS (default: kaizen compare's, every method), COMPARE_STEPS (default 20), COMPARE_EVAL_EVERY (default
# COMPARE_STEPS: the held-out loss before and after only), COMPARE_VAL (default 48: held-out pairs
# scored; the task's 111 cost about half a minute per evaluation here).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${KAIZEN_CACHE:-cache}"
OUT="${COMPARE_OUT:-$CACHE/runs/compare}"
METHODS=(${COMPARE_METHODS:+--methods "$COMPARE_METHODS"})
STEPS="${COMPARE_STEPS:-20}"
EVAL_EVERY="${COMPARE_EVAL_EVERY:-$STEPS}"
case "${COMPARE_MODEL:-smollm2}" in
  smollm2) GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"; TEMPLATE=() ;;
  gemma3) GGUF="$CACHE/gemma-3-270m-q4_k_m.gguf"; TEMPLATE=(--template plain) ;;
  *) echo "compare: COMPARE_MODEL must be smollm2 or gemma3" >&2; exit 2 ;;
esac

bash scripts/fetch_assets.sh "$CACHE"
cargo build --release --locked -p kaizen-cli
K=target/release/kaizen

DATA="$CACHE/manpages_ja"
python3 scripts/data/manpages_ja.py --cache "$CACHE" --out "$DATA"
VAL="$DATA/val_${COMPARE_VAL:-48}.jsonl"
head -n "${COMPARE_VAL:-48}" "$DATA/val.jsonl" > "$VAL"

GENERAL="$CACHE/botchan_general.jsonl"
python3 - "$CACHE/botchan.txt" "$GENERAL" <<'PY'
# The novel's text between Project Gutenberg's START and END markers (no header, no licence),
# cut at sentence ends into chunks of about 400 characters; 40 of them, spread over the book.
import json, re, sys
text = open(sys.argv[1], encoding="utf-8-sig").read()
body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK", 1)[1].split("\n", 1)[1]
if body.startswith("Produced by"):  # the transcribers' credit line
    body = body.split("\n", 1)[1]
body = body.split("*** END OF THIS PROJECT GUTENBERG EBOOK", 1)[0]
body = body.split("End of Project Gutenberg's", 1)[0]
sentences = re.split(r"(?<=[.!?\"])\s+", " ".join(body.split()))
chunks, cur = [], ""
for s in sentences:
    cur = f"{cur} {s}".strip()
    if len(cur) >= 400:
        chunks.append(cur)
        cur = ""
step = len(chunks) / 40
picked = [chunks[int(i * step)] for i in range(40)]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for c in picked:
        f.write(json.dumps({"text": c}, ensure_ascii=False) + "\n")
print(f"general text: {len(picked)} chunks of botchan.txt ({sum(map(len, picked))} characters) -> {sys.argv[2]}")
PY

$K compare --model "$GGUF" --data "$DATA/train.jsonl" --val-data "$VAL" \
    --general-data "$GENERAL" "${METHODS[@]}" --max-steps "$STEPS" --eval-every "$EVAL_EVERY" \
    "${TEMPLATE[@]}" --out "$OUT" "$@"
echo "report: $OUT/report.md"
