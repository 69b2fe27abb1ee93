#!/usr/bin/env bash
# LoRA training speed, kaizen vs PyTorch + PEFT, f32 and bf16, on SmolLM2-135M-Instruct (GGUF
# dequantized to f32; LoRA r=8 alpha=16 on q_proj,v_proj; AdamW lr 1e-4 constant, clip 1.0; batch
# 4 x 256 packed tokens of botchan.txt, no padding), in one run on this machine. Prints a table.
#   bash scripts/bench/train.sh [STEPS] [THREADS]      (default 7 steps, the first 2 untimed; 2 threads)
#   CEILING_F32=GFLOPS CEILING_BF16=GFLOPS bash scripts/bench/train.sh ...   (optional: a measured
#   GEMM ceiling of this machine per dtype, in GFLOP/s; each row's GFLOP/s is then also given as
#   a fraction of it, else "n/a")
# Takes about 2-3 minutes at the defaults on a quiet 2-core machine (four runs one after the
# other, 20-45 s each including the model load, plus the release build if it is stale).
# Needs the Python side: python3 -m venv .venv-bench && .venv-bench/bin/pip install -r scripts/reference/requirements.txt
# (or PYTHON=/path/to/python with torch, transformers, peft and gguf).
#
# Rows, run in this order, each alone on the machine: PyTorch+PEFT f32, kaizen f32, PyTorch+PEFT
# bf16, kaizen bf16. bf16 = the frozen base weights stored in bf16 and the linear layers' products
# in bf16 (f32 accumulation); LoRA and AdamW state stay f32 on both sides (kaizen --dtype bf16;
# PEFT's autocast_adapter_dtype=True default).
#
# Both sides train on the same rows: botchan.txt is cut into {"text"} lines of about 80 words
# (under 256 tokens, so --max-len never truncates one), each tokenized with BOS/EOS as kaizen
# does, concatenated and split into rows of 256 tokens (kaizen: --pack; train_torch.py copies
# it), taken in file order (--no-shuffle). So the first-step losses (LoRA B = 0) must agree:
# within 1e-3 relative in f32 and 1e-2 in bf16 (the relative difference of every step is printed;
# later steps may differ more because the two sides draw different random LoRA A matrices, so
# only step 1 is judged).
# s/step is the median over the timed steps (kaizen: B*T / tokens_per_sec of metrics.jsonl;
# PyTorch: wall time of forward+backward+clip+AdamW); tokens/s = B*T / s_step; GFLOP/s =
# useful FLOPs of a step (train_torch.py flops_per_step: 4*N*T + 6*P_lora*T + 12*B*L*S^2*d,
# about 608 GFLOP here, the same count for both dtypes) / s_step; peak RSS is the whole
# process's, load included.
# Quantized rows (QROWS, default "q8_0+int8 q4_k q4_k+int8 nf4 nf4+int8"; QROWS= skips them): kaizen on a quantized
# frozen base, after the four rows above. The GGUF is first converted once to an HF directory of
# f32 weights (`kaizen merge --model GGUF --out DIR`, no adapter: a GGUF given to --quantize keeps
# its own Q4_1 types), then each row is `kaizen train --model DIR --quantize TYPE --dtype bf16`
# (products in bf16 through dequantized panels), "+int8" adding `--compute int8` (activations
# quantized per 32-value block, integer dot products). Their ratios are against PyTorch bf16 and
# kaizen bf16; their first-step loss against kaizen bf16's (what quantizing the base costs).
# Scratch files live in a temporary directory under the cache, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS="${1:-7}"
THREADS="${2:-2}"
WARMUP=2
BATCH=4
SEQ=256
WORDS_PER_LINE=80
PY="${PYTHON:-.venv-bench/bin/python}"
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT="$CACHE/botchan.txt"
CEILING_F32="${CEILING_F32:-}"
CEILING_BF16="${CEILING_BF16:-}"
QROWS="${QROWS-q8_0+int8 q4_k q4_k+int8 nf4 nf4+int8}"

die() { echo "bench/train: error: $*" >&2; exit 1; }
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -gt "$WARMUP" ]] || die "STEPS must be an integer above $WARMUP (got '$STEPS')"
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
for c in CEILING_F32 CEILING_BF16; do
    [[ -z "${!c}" || "${!c}" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$c must be a number of GFLOP/s (got '${!c}')"
done
command -v python3 >/dev/null || die "python3 not found (used to drive kaizen and print the table)"
[[ -x "$PY" ]] || command -v "$PY" >/dev/null || die "no Python at '$PY'; set PYTHON=... or create .venv-bench (see the header of $0)"
"$PY" -c "import torch, transformers, peft, gguf" 2>/dev/null \
    || die "$PY lacks torch/transformers/peft/gguf: $PY -m pip install -r scripts/reference/requirements.txt"

bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed (see above)"
cargo build --release --locked -p kaizen-cli || die "cargo build failed"
[[ "$(target/release/kaizen train --help)" == *--dtype* ]] \
    || die "target/release/kaizen train has no --dtype flag (an older build?)"

TMP="$(mktemp -d "$CACHE/.bench-train.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
DATA="$TMP/botchan.jsonl"

# botchan.txt -> {"text"} lines of at least WORDS_PER_LINE words (whole source lines, joined by \n).
python3 scripts/bench/kaizen_run.py jsonl "$TEXT" "$DATA" "$WORDS_PER_LINE" || die "building $DATA failed"

run_kaizen() {
    python3 scripts/bench/kaizen_run.py train --gguf "${MODEL:-$GGUF}" --data "$DATA" --out "$TMP/kaizen-$1" \
        --dtype "$1" --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" --batch-size "$BATCH" \
        --max-len "$SEQ" --lr 1e-4 "${@:2}" | tail -n 1
}

run_torch() {
    "$PY" scripts/bench/train_torch.py --gguf "$GGUF" --data "$DATA" --dtype "$1" --threads "$THREADS" \
        --steps "$STEPS" --warmup "$WARMUP" --batch-size "$BATCH" --max-len "$SEQ" --json | tail -n 1
}

T=$(run_torch f32) || die "train_torch.py --dtype f32 failed"
K=$(run_kaizen f32) || die "kaizen train --dtype f32 failed"
TB=$(run_torch bf16) || die "train_torch.py --dtype bf16 failed"
KB=$(run_kaizen bf16) || die "kaizen train --dtype bf16 failed"
Q=()
if [[ -n "$QROWS" ]]; then
    target/release/kaizen merge --model "$GGUF" --out "$TMP/f32-base" >&2 || die "kaizen merge (convert) of $GGUF failed"
    for q in $QROWS; do
        args=(--quantize "${q%+*}")
        [[ "$q" == *+int8 ]] && args+=(--compute int8)
        Q+=("$(MODEL="$TMP/f32-base" run_kaizen bf16 "${args[@]}")") || die "kaizen train ${args[*]} failed"
    done
fi
python3 - "$K" "$T" "$KB" "$TB" "$THREADS" "$STEPS" "$WARMUP" "$CEILING_F32" "$CEILING_BF16" "${Q[@]}" <<'PY'
import json, sys
k, t, kb, tb = (json.loads(a) for a in sys.argv[1:5])
quant = [json.loads(a) for a in sys.argv[10:]]
threads, steps, warmup = sys.argv[5:8]
ceiling = {"f32": float(sys.argv[8]) if sys.argv[8] else None,
           "bf16": float(sys.argv[9]) if sys.argv[9] else None}
gflop = t["gflop_per_step"]
rows = (k, t, kb, tb)
name = lambda r: "pytorch+peft" if r["impl"] == "pytorch" else r["impl"]
label = lambda r: f"{name(r)} {r['dtype']}"
gfs = lambda r: gflop / r["s_step"]
def of_ceiling(r):
    c = ceiling[r["dtype"]]
    return f"{100 * gfs(r) / c:.0f}%" if c else "n/a"

print(f"SmolLM2-135M-Instruct LoRA training (r=8, q_proj,v_proj), batch {t['batch_size']} x {t['max_len']} tokens, "
      f"{threads} threads, {steps} steps ({warmup} warm-up), {gflop:.0f} GFLOP/step")
print("| impl | dtype | s/step | tokens/s | GFLOP/s | of GEMM ceiling | peak RSS MB | tokens/s vs PyTorch f32 "
      "| tokens/s vs PyTorch bf16 |")
print("|---|---|---|---|---|---|---|---|---|")
for r in (k, t, kb, tb):
    vs_bf16 = f"{r['tokens_per_sec'] / tb['tokens_per_sec']:.2f}x" if r["dtype"] == "bf16" else "-"
    print(f"| {name(r)} | {r['dtype']} | {r['s_step']:.2f} | {r['tokens_per_sec']:.1f} | {gfs(r):.1f} | "
          f"{of_ceiling(r)} | {r['peak_rss_mb']:.0f} | {r['tokens_per_sec'] / t['tokens_per_sec']:.2f}x | {vs_bf16} |")
print(f"kaizen f32 / pytorch f32: tokens/s {k['tokens_per_sec'] / t['tokens_per_sec']:.2f}x; "
      f"peak RSS {k['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
print(f"kaizen bf16 / pytorch bf16: tokens/s {kb['tokens_per_sec'] / tb['tokens_per_sec']:.2f}x; "
      f"peak RSS {kb['peak_rss_mb'] / tb['peak_rss_mb']:.2f}x")
print(f"kaizen bf16 / kaizen f32: tokens/s {kb['tokens_per_sec'] / k['tokens_per_sec']:.2f}x; "
      f"peak RSS {kb['peak_rss_mb'] / k['peak_rss_mb']:.2f}x")
fmt_c = lambda d: f"{ceiling[d]:g} GFLOP/s" if ceiling[d] else "n/a (set CEILING_" + d.upper() + ")"
print(f"achieved GFLOP/s ({gflop:.0f} GFLOP/step; GEMM ceiling f32 {fmt_c('f32')}, bf16 {fmt_c('bf16')}): "
      + "; ".join(f"{label(r)} {gfs(r):.1f} ({of_ceiling(r)}" + (" of ceiling)" if ceiling[r["dtype"]] else ")")
                  for r in rows))
fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)
for r in rows:
    print(f"{label(r):>17} loss: {fmt(r['losses'])}")
for r in rows:
    print(f"{label(r):>17} s/step: {' '.join(f'{x:.2f}' for x in r['step_seconds'])}")
print(f"pytorch versions: torch {t['torch']}, transformers {t['transformers']}, peft {t['peft']}, "
      f"attention {t['attn_implementation']}; pytorch load peak RSS {t['load_peak_rss_mb']:.0f} MB (f32), "
      f"{tb['load_peak_rss_mb']:.0f} MB (bf16); pytorch bf16 adapter dtype {tb.get('adapter_dtype')}")
print(f"trainable params: kaizen {k['trainable_params']} (f32), {kb['trainable_params']} (bf16); "
      f"pytorch {t['trainable_params']}; kaizen LoRA only: "
      + ", ".join(f"{r['dtype']} {'yes' if r['lora_only'] else 'NO'} ({r['lora_only_why']})" for r in (k, kb)))
bad = 0
for a, b, tol in ((k, t, 1e-3), (kb, tb, 1e-2)):
    rels = [abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"])]
    print(f"{label(a)} vs {label(b)} loss, relative difference per step: {' '.join(f'{x:.1e}' for x in rels)}")
    if rels[0] > tol:
        bad += 1
        print(f"WARNING: {a['dtype']} first-step losses differ by {rels[0]:.2e} relative (> {tol:.0e}): "
              f"kaizen {a['losses'][0]:.6f}, pytorch {b['losses'][0]:.6f} (same rows, LoRA B = 0: they should agree)")
    else:
        print(f"{a['dtype']} first-step loss agrees: kaizen {a['losses'][0]:.6f}, pytorch {b['losses'][0]:.6f} "
              f"({rels[0]:.1e} relative, tolerance {tol:.0e})")
if quant:
    print("\nkaizen on a quantized frozen base (the GGUF converted to f32, then quantized while loading), bf16 products:")
    print("| base | compute | s/step | tokens/s | peak RSS MB | tokens/s vs PyTorch bf16 | tokens/s vs kaizen bf16 "
          "| peak RSS vs kaizen bf16 | step-1 loss | vs kaizen bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in quant:
        rel = (r["losses"][0] - kb["losses"][0]) / kb["losses"][0]
        print(f"| {r['quantize']} | {r['compute'] or 'bf16'} | {r['s_step']:.2f} | {r['tokens_per_sec']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['tokens_per_sec'] / tb['tokens_per_sec']:.2f}x | "
              f"{r['tokens_per_sec'] / kb['tokens_per_sec']:.2f}x | {r['peak_rss_mb'] / kb['peak_rss_mb']:.2f}x | "
              f"{r['losses'][0]:.4f} | {rel:+.2%} |")
    for r in quant:
        print(f"{'kaizen ' + r['quantize'] + ('+' + r['compute'] if r['compute'] else ''):>17} loss: {fmt(r['losses'])}")
for r in [k, kb] + quant:
    if not r["lora_only"]:
        print(f"WARNING: kaizen {r['dtype']}: not only LoRA tensors train: {r['lora_only_why']}")
PY
