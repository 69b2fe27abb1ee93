#!/usr/bin/env bash
# LoRA training at scale (issue 12): kaizen against PyTorch + PEFT on random-weight models of real
# shapes, f32, bf16 and 4/8-bit quantized bases, one row at a time. Prints a markdown table per
# batch configuration.
#   bash scripts/bench/scale.sh [SHAPE] [BATCHxT ...]
#     SHAPE: rinna36 (default; GPT-NeoX 3.6B, rinna/japanese-gpt-neox-3.6b's config), llama8b
#     (Llama-3-8B's shape), tiny / tiny-llama (2 layers, hidden 64: a pipeline check in seconds).
#     BATCHxT: batch configurations, default 1x128 4x128 1x512 (rinna36, tiny), 1x512 (llama8b,
#     tiny-llama).
#   Environment: STEPS (4) optimizer steps per row, of which WARMUP (1) untimed; THREADS (2);
#   MEM_GB (24) the memory budget in GB (1e9 bytes); ROWS (all) a comma-separated subset of
#   torch-f32,torch-bf16,torch-bnb4,kaizen-f32,kaizen-bf16,kaizen-q8_0,kaizen-q4_k,kaizen-nf4,
#   kaizen-q8_0-int8,kaizen-q4_k-int8,kaizen-nf4-int8,kaizen-q4_k_m; KAIZEN_EXTRA more `kaizen train` flags for every kaizen row (e.g.
#   --gradient-checkpointing; shown in the rows' labels); FORCE=1 runs rows whose estimate exceeds the memory available now (not the budget);
#   PYTHON (.venv-bench/bin/python) with torch, transformers, peft, bitsandbytes;
#   KAIZEN_BIN (default: cargo build --release and target/release/kaizen).
#   e.g. PYTHON=/work/pyenv/bin/python bash scripts/bench/scale.sh tiny 1x64 2x32
#
# The model directory is made once by scripts/bench/make_scale_model.py under
# ${KAIZEN_CACHE:-cache}/scale/SHAPE (rinna36 7.2 GB, llama8b 16.1 GB of bf16 safetensors; weights
# N(0, 0.02), norms 1, seeded; the 600-token BPE of tests/fixtures/tokenizers/bpe).
#
# Rows, in this order for each batch configuration, each alone on the machine (a fresh process):
#   pytorch+peft f32           scale_torch.py --mode f32: the bf16 checkpoint loaded as f32
#   pytorch+peft bf16          --mode bf16 (PEFT's default: adapters f32)
#   pytorch+peft+bnb nf4       --mode bnb4: BitsAndBytesConfig(load_in_4bit, nf4, compute bf16)
#   kaizen f32 / bf16          kaizen train --dtype f32 / --dtype bf16
#   kaizen q8_0 / q4_k / nf4   kaizen train --quantize TYPE --dtype bf16
#   kaizen q8_0 / q4_k / nf4 int8  the same with --compute int8 (VNNI integer products; NF4's
#                              levels rounded to 8-bit codes)
#   kaizen q4_k_m              --quantize q4_k --quantize-embeddings q4_k,q6_k: the table and head
#                              too, in llama.cpp's Q4_K_M types (not in ROWS' default list)
# All: LoRA r=8 alpha=16 dropout 0 on the attention projections (GPT-NeoX query_key_value; Llama
# q_proj,k_proj,v_proj,o_proj), AdamW lr 1e-4 constant, clip 1.0, no gradient checkpointing.
# Data: a seeded JSONL of pseudo-word {"text"} lines (scale_run.py data), tokenized with the
# model's tokenizer, EOS-terminated, packed into rows of T tokens in file order (kaizen --pack
# --no-shuffle; scale_torch.py packs the same way), so every row trains on the same token rows and
# the first-step losses (LoRA B = 0) agree up to the base's precision (random weights: ~ln(vocab)).
# Each row's loss is compared with a reference row: f32 rows with PyTorch f32, bf16/q8_0/q4_k with
# PyTorch bf16, kaizen nf4 with PyTorch+bnb nf4.
# s/step: median over the timed steps (kaizen: B*T / tokens_per_sec of metrics.jsonl; PyTorch:
# forward+backward+clip+AdamW wall time); tokens/s = B*T / s/step; peak RSS: ru_maxrss of the row's
# process (load included, mmapped file pages included), GB = 1e9 bytes. Ratios are against the
# PyTorch bf16 row of the same configuration.
# Memory guard (scale_run.py): each row's memory is estimated first; a row over MEM_GB is skipped
# ("does not fit 24 GB"), and a watchdog kills a row whose anonymous memory passes
# min(MEM_GB, available memory - 0.5 GB), so the machine never swaps or OOMs.
# Time: tiny shapes ~2 minutes in all; rinna36 at the defaults on 2 cores 1-3 hours (a
# 1x512 step is ~7 TFLOP); llama8b longer per row but fewer rows fit.
# Scratch in a temporary directory under the cache, removed on exit; the rows' JSON lines are kept
# in ${KAIZEN_CACHE:-cache}/scale/last-SHAPE.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHAPE="${1:-rinna36}"
shift || true
CONFIGS=("$@")
STEPS="${STEPS:-4}"
WARMUP="${WARMUP:-1}"
THREADS="${THREADS:-2}"
MEM_GB="${MEM_GB:-24}"
DEFAULT_ROWS="torch-f32,torch-bf16,torch-bnb4,kaizen-f32,kaizen-bf16,kaizen-q8_0,kaizen-q4_k,kaizen-nf4,kaizen-q8_0-int8,kaizen-q4_k-int8,kaizen-nf4-int8"
ALL_ROWS="$DEFAULT_ROWS,kaizen-q4_k_m"
ROWS="${ROWS:-$DEFAULT_ROWS}"
PY="${PYTHON:-.venv-bench/bin/python}"
CACHE="${KAIZEN_CACHE:-cache}"

die() { echo "bench/scale: error: $*" >&2; exit 1; }
case "$SHAPE" in
    rinna36|tiny) [[ ${#CONFIGS[@]} -gt 0 ]] || CONFIGS=(1x128 4x128 1x512) ;;
    llama8b|tiny-llama) [[ ${#CONFIGS[@]} -gt 0 ]] || CONFIGS=(1x512) ;;
    *) die "unknown SHAPE '$SHAPE' (rinna36, llama8b, tiny, tiny-llama)" ;;
esac
for c in "${CONFIGS[@]}"; do
    [[ "$c" =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || die "batch configuration must be BATCHxT, e.g. 4x128 (got '$c')"
done
[[ "$STEPS" =~ ^[0-9]+$ && "$WARMUP" =~ ^[0-9]+$ && "$STEPS" -gt "$WARMUP" ]] \
    || die "STEPS must be an integer above WARMUP (got STEPS='$STEPS' WARMUP='$WARMUP')"
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
[[ "$MEM_GB" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "MEM_GB must be a number of GB (got '$MEM_GB')"
IFS=, read -r -a ROW_LIST <<<"$ROWS"
for r in "${ROW_LIST[@]}"; do
    [[ ",$ALL_ROWS," == *",$r,"* ]] || die "unknown row '$r' in ROWS (known: $ALL_ROWS)"
done
command -v python3 >/dev/null || die "python3 not found (drives the rows and prints the table)"
[[ -x "$PY" ]] || command -v "$PY" >/dev/null || die "no Python at '$PY'; set PYTHON=... (see the header of $0)"
"$PY" -c "import torch, transformers, peft, safetensors" 2>/dev/null \
    || die "$PY lacks torch/transformers/peft/safetensors: $PY -m pip install -r scripts/reference/requirements.txt"
"$PY" -c "import bitsandbytes" 2>/dev/null \
    || echo "bench/scale: note: $PY has no bitsandbytes; the pytorch+peft+bnb nf4 row will fail" >&2

if [[ -n "${KAIZEN_BIN:-}" ]]; then
    KAIZEN="$KAIZEN_BIN"
else
    cargo build --release --locked -p kaizen-cli || die "cargo build failed"
    KAIZEN=target/release/kaizen
fi
[[ -x "$KAIZEN" ]] || die "no kaizen binary at '$KAIZEN'"
HELP="$("$KAIZEN" train --help)"
[[ "$HELP" == *--dtype* ]] || die "$KAIZEN train has no --dtype flag (an older build?)"
[[ "$HELP" == *--quantize* ]] || echo "bench/scale: note: $KAIZEN train has no --quantize; the quantized kaizen rows will fail" >&2

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$COMMIT" != unknown && -n "$(git --no-optional-locks status --porcelain 2>/dev/null)" ]]; then
    COMMIT="$COMMIT dirty"
fi

MODEL="$("$PY" scripts/bench/make_scale_model.py "$SHAPE" --out "$CACHE/scale/$SHAPE" | tail -n 1)" \
    || die "making the $SHAPE model directory failed"

TMP="$(mktemp -d "$CACHE/.bench-scale.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
DATA="$TMP/data.jsonl"
TOKENS=0
for c in "${CONFIGS[@]}"; do
    n=$(( STEPS * ${c%x*} * ${c#*x} ))
    (( n > TOKENS )) && TOKENS=$n
done
python3 scripts/bench/scale_run.py data "$DATA" --tokens "$TOKENS" || die "building $DATA failed"

RESULTS="$TMP/rows.jsonl"
: >"$RESULTS"
FORCE_FLAG=()
[[ "${FORCE:-0}" == 1 ]] && FORCE_FLAG=(--force)
echo "bench/scale: $SHAPE ($MODEL), configurations ${CONFIGS[*]}, rows $ROWS, $STEPS steps ($WARMUP untimed), $THREADS threads, commit $COMMIT" >&2
for c in "${CONFIGS[@]}"; do
    for r in "${ROW_LIST[@]}"; do
        python3 scripts/bench/scale_run.py row --row "$r" --model "$MODEL" --data "$DATA" \
            --batch "${c%x*}" --seq "${c#*x}" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" \
            --mem-gb "$MEM_GB" --scratch "$TMP/$c" --python "$PY" --kaizen "$KAIZEN" "${FORCE_FLAG[@]}" \
            --kaizen-extra="${KAIZEN_EXTRA:-}" \
            >>"$RESULTS" \
            || die "scale_run.py row $r $c crashed"
    done
done
cp "$RESULTS" "$CACHE/scale/last-$SHAPE.jsonl"
python3 scripts/bench/scale_run.py table "$RESULTS" --shape "$SHAPE" --commit "$COMMIT" --threads "$THREADS" \
    --steps "$STEPS" --warmup "$WARMUP"
