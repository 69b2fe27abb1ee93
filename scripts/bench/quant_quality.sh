#!/usr/bin/env bash
# Quality of LoRA on a quantized frozen base (QLoRA), kaizen only: does training on a q8_0 / q4_k /
# nf4 / nf4_dq base reach the held-out loss of the same LoRA trained on the bf16 base? (Issue 12's
# target: within 2%.) Loss-only measurements: the machine's load changes how long it takes, never
# a number in the table.
#   bash scripts/bench/quant_quality.sh [STEPS] [THREADS]     (default 40 steps, 2 threads)
#   MODELS="smollm2 gemma3" TYPES="bf16 q8_0 q4_k nf4 nf4_dq" bash scripts/bench/quant_quality.sh
#   TYPES="bf16 nf4 nf4+int8"   (a type ending in +int8 adds --compute int8: integer products)
#   KAIZEN_BIN=path/to/kaizen bash scripts/bench/quant_quality.sh   (use that binary, no build)
# Takes about 1.5 hours at the defaults on a 2-core machine (10 training runs of 40 steps, SmolLM2
# about 4-6 s a step and Gemma 3 about 10-15 s a step, plus two evaluations per run; see the
# footer for this run's time), plus the release build if it is stale. Standard library Python only.
#
# Models: SmolLM2-135M-Instruct (cache/SmolLM2-135M-Instruct.Q4_1.gguf) and Gemma 3 270M base
# (cache/gemma-3-270m-q4_k_m.gguf), fetched by scripts/fetch_assets.sh. A GGUF given with
# --quantize keeps its own quantized types, so each GGUF is first converted once to an HF
# directory with f32 weights (`kaizen merge --model X.gguf --out DIR`, no adapter) and every row
# quantizes that same dense base: bf16 = `--dtype bf16` (the reference), the others = `--quantize
# T --dtype bf16` (frozen linear layers inside the blocks held as T, products in bf16; the
# embedding / tied head stays bf16). A K-quant whose rows are not whole 256-value blocks falls
# back as llama.cpp's quantizer does (Q4_K -> Q5_0, Q6_K -> Q8_0): the "resident" column, from
# `kaizen inspect --model BASE [--quantize T] --dtype bf16`, lists the types really held (bytes
# of the matrices; a tied head counted once).
#
# Data: cache/botchan.txt cut into {"text"} lines of about 80 words (kaizen_run.py jsonl, as
# train.sh); the first 90% of the lines train, the last 10% are the held-out set. Training: LoRA
# r=8 alpha 16 dropout 0 on q_proj,v_proj, AdamW lr 1e-4 constant, clip 1.0, seed 0, batch 4 x 256
# tokens packed (--pack), file order (--no-shuffle), STEPS steps (40 x 4 x 256 = 40,960 tokens,
# under one pass over the training lines). Every row of a model sees the same rows in the same
# order and starts from the same seed-0 LoRA A (B = 0), so step 1's loss is the quantized base's
# own loss on the first batch (each step's loss is of a different batch: the curve is noisy, the
# held-out loss is the measure).
# Columns: loss at step 1 and at the last step (metrics.jsonl); held-out loss of the base alone
# (`kaizen eval --model BASE --data HELDOUT --max-len 256 --json` with the row's --quantize /
# --dtype; mean token NLL over the held-out lines) and its relative difference to the bf16 row's
# (what quantizing alone costs); the same with the trained adapter (`--adapter RUN`), and whether
# that is within 2% of the bf16 row's (the target).
# Scratch files (f32 bases, runs) live in a temporary directory under the cache, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS="${1:-40}"
THREADS="${2:-2}"
MODELS="${MODELS:-smollm2 gemma3}"
TYPES="${TYPES:-bf16 q8_0 q4_k nf4 nf4_dq}"
BATCH=4
SEQ=256
WORDS_PER_LINE=80
HELDOUT_PERCENT=10
TOLERANCE=0.02
CACHE="${KAIZEN_CACHE:-cache}"
TEXT="$CACHE/botchan.txt"

die() { echo "bench/quant_quality: error: $*" >&2; exit 1; }
log() { echo "bench/quant_quality: $*" >&2; }
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -ge 1 ]] || die "STEPS must be a positive integer (got '$STEPS')"
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
for m in $MODELS; do
    case "$m" in smollm2|gemma3) ;; *) die "MODELS: unknown model '$m' (smollm2, gemma3)" ;; esac
done
for t in $TYPES; do
    case "${t%+int8}" in bf16|q8_0|q4_0|q4_k|q5_k|q6_k|nf4|nf4_dq) ;;
        *) die "TYPES: unknown base type '$t' (bf16, q8_0, q4_0, q4_k, q5_k, q6_k, nf4, nf4_dq)" ;; esac
done
[[ " $TYPES " == *" bf16 "* ]] || die "TYPES must include bf16 (the reference row)"
command -v python3 >/dev/null || die "python3 not found (used to build the data and print the table)"

START=$(date +%s)
bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed (see above)"
if [[ -n "${KAIZEN_BIN:-}" ]]; then
    K="$KAIZEN_BIN"
else
    cargo build --release --locked -p kaizen-cli || die "cargo build failed"
    K="${CARGO_TARGET_DIR:-target}/release/kaizen"
fi
[[ -x "$K" ]] || die "no kaizen binary at $K"
[[ "$("$K" train --help)" == *--quantize* ]] || die "$K train has no --quantize flag (an older build?)"

TMP="$(mktemp -d "$CACHE/.bench-quant.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
RESULTS="$TMP/results.jsonl"
: > "$RESULTS"

# botchan.txt -> {"text"} lines; the first (100 - HELDOUT_PERCENT)% train, the rest are held out.
python3 scripts/bench/kaizen_run.py jsonl "$TEXT" "$TMP/all.jsonl" "$WORDS_PER_LINE" || die "building the data failed"
python3 - "$TMP/all.jsonl" "$TMP/train.jsonl" "$TMP/heldout.jsonl" "$HELDOUT_PERCENT" <<'PY' || die "splitting the data failed"
import sys
lines = open(sys.argv[1], encoding="utf-8").readlines()
cut = len(lines) - max(1, len(lines) * int(sys.argv[4]) // 100)
open(sys.argv[2], "w", encoding="utf-8").writelines(lines[:cut])
open(sys.argv[3], "w", encoding="utf-8").writelines(lines[cut:])
print(f"bench/quant_quality: {len(lines)} lines of botchan.txt: {cut} train, {len(lines) - cut} held out",
      file=sys.stderr)
PY

export RAYON_NUM_THREADS="$THREADS"
last_json() { grep '^{' | tail -n 1; }

for model in $MODELS; do
    case "$model" in
        smollm2) GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"; NAME="SmolLM2-135M-Instruct" ;;
        gemma3) GGUF="$CACHE/gemma-3-270m-q4_k_m.gguf"; NAME="Gemma 3 270M" ;;
    esac
    BASE="$TMP/$model-f32"
    log "$NAME: converting $GGUF to an f32 HF directory"
    "$K" merge --model "$GGUF" --out "$BASE" >&2 || die "kaizen merge (convert) of $GGUF failed"
    for t in $TYPES; do
        if [[ "$t" == bf16 ]]; then Q=(--dtype bf16); else Q=(--quantize "${t%+int8}" --dtype bf16); fi
        [[ "$t" == *+int8 ]] && Q+=(--compute int8)
        RUN="$TMP/$model-$t"
        log "$NAME, base $t: inspect, held-out loss of the base, $STEPS training steps, held-out loss after"
        RESIDENT=$("$K" inspect --model "$BASE" "${Q[@]}" | sed -n 's/^resident: *//p')
        [[ -n "$RESIDENT" ]] || die "kaizen inspect printed no 'resident:' line ($NAME, $t)"
        EVAL0=$("$K" eval --model "$BASE" "${Q[@]}" --data "$TMP/heldout.jsonl" --max-len "$SEQ" --json | last_json) \
            || die "kaizen eval of the base failed ($NAME, $t)"
        t0=$(date +%s)
        "$K" train --model "$BASE" "${Q[@]}" --data "$TMP/train.jsonl" --out "$RUN" --overwrite \
            --max-len "$SEQ" --pack --batch-size "$BATCH" --r 8 --lora-alpha 16 --lora-dropout 0 \
            --target-modules q_proj,v_proj --optimizer adamw --lr 1e-4 --lr-schedule constant \
            --max-grad-norm 1.0 --max-steps "$STEPS" --seed 0 --no-shuffle > "$RUN.log" 2>&1 \
            || { tail -n 20 "$RUN.log" >&2; die "kaizen train failed ($NAME, $t)"; }
        TRAIN_S=$(( $(date +%s) - t0 ))
        EVAL1=$("$K" eval --model "$BASE" "${Q[@]}" --adapter "$RUN" --data "$TMP/heldout.jsonl" --max-len "$SEQ" --json | last_json) \
            || die "kaizen eval with the adapter failed ($NAME, $t)"
        python3 - "$RESULTS" "$NAME" "$t" "$RUN" "$RESIDENT" "$EVAL0" "$EVAL1" "$TRAIN_S" "$STEPS" <<'PY' || die "collecting the results failed ($NAME, $t)"
import json, os, re, sys
out, name, t, run_dir, resident, e0, e1, train_s, steps = sys.argv[1:]
run = json.load(open(os.path.join(run_dir, "run.json")))
want_q = None if t == "bf16" else t.removesuffix("+int8")
want_c = "int8" if t.endswith("+int8") else None
if run.get("dtype") != "bf16" or run.get("quantize") != want_q or run.get("compute") != want_c:
    sys.exit(f"{run_dir}/run.json records dtype {run.get('dtype')!r}, quantize {run.get('quantize')!r}, "
             f"compute {run.get('compute')!r}; asked for bf16, {want_q!r}, {want_c!r}")
logs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
logs = [r for r in logs if "loss" in r and "step" in r]
if len(logs) != int(steps):
    sys.exit(f"{run_dir}/metrics.jsonl has {len(logs)} step lines, expected {steps}")
log = open(run_dir + ".log").read()
m = re.search(r"trainable params: (\d+)", log)
total = re.match(r"([0-9.]+) GB in matrices: (.*)$", resident)
held = [(l, float(gb), int(n)) for l, gb, n in re.findall(r"(\S+) ([0-9.]+) GB \((\d+) matrices\)", total.group(2))]
e0, e1 = json.loads(e0), json.loads(e1)
with open(out, "a") as f:
    f.write(json.dumps({
        "model": name, "type": t, "resident_gb": float(total.group(1)), "held": held,
        "loss_first": logs[0]["loss"], "loss_last": logs[-1]["loss"], "losses": [r["loss"] for r in logs],
        "grad_norms": [r["grad_norm"] for r in logs], "heldout_base": e0["loss"], "heldout": e1["loss"],
        "heldout_tokens": e1["tokens"], "trainable": int(m.group(1)) if m else None,
        "train_seconds": int(train_s),
    }) + "\n")
PY
    done
    rm -rf "$BASE"
done

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$COMMIT" != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    COMMIT="$COMMIT (with uncommitted changes)"
fi
python3 - "$RESULTS" "$STEPS" "$THREADS" "$BATCH" "$SEQ" "$HELDOUT_PERCENT" "$TOLERANCE" "$COMMIT" "$(( $(date +%s) - START ))" <<'PY'
import json, math, sys
path, steps, threads, batch, seq, held_pct, tol, commit, secs = sys.argv[1:]
tol = float(tol)
rows = [json.loads(l) for l in open(path)]
ref = {r["model"]: r for r in rows if r["type"] == "bf16"}
tokens = {r["model"]: r["heldout_tokens"] for r in rows}
print(f"LoRA (r=8, alpha 16, q_proj,v_proj; AdamW lr 1e-4, seed 0) on a quantized base, {steps} steps of "
      f"{batch} x {seq} packed tokens of botchan.txt; held-out = its last {held_pct}% ("
      + ", ".join(f"{n} tokens for {m}" for m, n in tokens.items()) + "); products in bf16 on every row but the +int8 ones (--compute int8)")
print()
print("| model | base | resident (matrices) | loss step 1 | loss step " + steps + " | held-out, base alone "
      "| base alone vs bf16 | held-out, trained | trained vs bf16 | within 2% |")
print("|---|---|---|---|---|---|---|---|---|---|")
notes, bad = [], 0
for r in rows:
    b = ref[r["model"]]
    rel = (r["heldout"] - b["heldout"]) / b["heldout"]
    rel0 = (r["heldout_base"] - b["heldout_base"]) / b["heldout_base"]
    ok = abs(rel) <= tol and math.isfinite(r["heldout"])
    held = ", ".join(f"{l} x{n}" for l, gb, n in r["held"])
    want = r["type"].removesuffix("+int8").upper().replace("NF4_DQ", "NF4+DQ")
    labels = [l for l, gb, n in r["held"] if l != "BF16"]
    if r["type"] != "bf16" and labels != [want]:
        notes.append(f"{r['model']} {r['type']}: held as " + ", ".join(f"{l} ({n} matrices, {gb:.3f} GB)"
                     for l, gb, n in r["held"]) + " (rows not whole 256-value blocks fall back)")
    if not all(math.isfinite(x) for x in r["losses"]) or not r["heldout"] < r["heldout_base"]:
        notes.append(f"{r['model']} {r['type']}: training did not lower the held-out loss "
                     f"({r['heldout_base']:.4f} -> {r['heldout']:.4f}; train loss {r['loss_first']:.4f} -> "
                     f"{r['loss_last']:.4f})")
    if r["trainable"] != b["trainable"]:
        notes.append(f"{r['model']} {r['type']}: {r['trainable']} trainable params, the bf16 row {b['trainable']}")
    bad += 0 if ok else 1
    print(f"| {r['model']} | {r['type']} | {r['resident_gb']:.3f} GB ({held}) | {r['loss_first']:.4f} | "
          f"{r['loss_last']:.4f} | {r['heldout_base']:.4f} | {'-' if r['type'] == 'bf16' else f'{100 * rel0:+.2f}%'} | "
          f"{r['heldout']:.4f} | {'-' if r['type'] == 'bf16' else f'{100 * rel:+.2f}%'} | {'yes' if ok else 'NO'} |")
print()
for n in notes:
    print(f"note: {n}")
print(f"{len(rows) - bad}/{len(rows)} rows within {100 * tol:.0f}% of the bf16 base's held-out loss after training")
for r in rows:
    print(f"{r['model']} {r['type']}: training {r['train_seconds']} s; loss "
          + " ".join(f"{x:.3f}" for x in r["losses"]))
m, s = divmod(int(secs), 60)
print(f"commit {commit}; {threads} threads; whole run {m} min {s} s")
PY
