#!/usr/bin/env bash
# Generation speed, kaizen vs PyTorch `generate`, on SmolLM2-135M-Instruct (GGUF dequantized;
# batch 1, greedy, chat template, a fixed number of new tokens, KV cache), f32 and bf16, in one
# run on this machine. Prints one table.
#   bash scripts/bench/generate.sh [NEW_TOKENS] [THREADS]      (default 64 new tokens, 2 threads)
# Takes about 2-3 minutes at the defaults on a quiet 2-core machine (a 2-step adapter training,
# one merge, 18 kaizen processes of ~2-3 s, 2 PyTorch processes of ~30 s, plus the release build
# if it is stale).
# Needs the Python side: python3 -m venv .venv-bench && .venv-bench/bin/pip install -r scripts/reference/requirements.txt
# (or PYTHON=/path/to/python with torch, transformers, peft and gguf).
#
# Rows per dtype (f32, then bf16), run one after the other:
#   kaizen base       kaizen generate --model GGUF --dtype D
#   kaizen merged     kaizen generate --model MERGED --dtype D, MERGED = `kaizen merge --model GGUF
#                     --adapter ADAPTER` (an HF directory with the LoRA folded in, f32 weights)
#   kaizen unmerged   kaizen generate --model GGUF --adapter ADAPTER --dtype D (LoRA applied on
#                     the fly: base product + B(A x) in every q_proj/v_proj)
#   pytorch base      generate_torch.py --dtype D (transformers generate; bf16 = the whole model
#                     loaded with dtype=torch.bfloat16)
# ADAPTER: LoRA r=8 alpha 16 on q_proj,v_proj (train.sh's setup) trained by `kaizen train` for 2
# steps at lr 1e-3 on botchan.txt (batch 1 x 256 tokens), so lora_B is nonzero (checked).
# Targets: kaizen base tokens/s >= PyTorch's (same dtype); merged at 1.00x kaizen base; unmerged
# within 5% of kaizen base.
# Seconds cover prefill + decoding, load excluded. kaizen: best of 3 fresh processes (its own
# --json timing); PyTorch: median of 3 after a warm-up generate. Peak RSS is the whole process's,
# load included (kaizen: the largest of its 3 runs). The merged rows load an f32 safetensors
# directory through a memory map, so their ru_maxrss also counts the ~520 MB of mapped file pages
# (RssFile: clean, reclaimable page cache) on top of the same ~550 MB of owned memory (RssAnon) as
# the base rows: read that column's merged figure as ~base + the file size, not as a 2x heap.
# Scratch files (adapter, merged model, ~540 MB) live in a temporary directory under the cache,
# removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-64}"
THREADS="${2:-2}"
RUNS=3
PY="${PYTHON:-.venv-bench/bin/python}"
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT="$CACHE/botchan.txt"
PROMPT="Write a short story about a robot who learns to paint."

die() { echo "bench/generate: error: $*" >&2; exit 1; }
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 ]] || die "NEW_TOKENS must be a positive integer (got '$N')"
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
command -v python3 >/dev/null || die "python3 not found (used to drive kaizen and print the table)"
[[ -x "$PY" ]] || command -v "$PY" >/dev/null || die "no Python at '$PY'; set PYTHON=... or create .venv-bench (see the header of $0)"
"$PY" -c "import torch, transformers, gguf" 2>/dev/null \
    || die "$PY lacks torch/transformers/gguf: $PY -m pip install -r scripts/reference/requirements.txt"

bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed (see above)"
cargo build --release --locked -p kaizen-cli || die "cargo build failed"
[[ "$(target/release/kaizen generate --help)" == *--dtype* ]] \
    || die "target/release/kaizen generate has no --dtype flag (an older build?)"

TMP="$(mktemp -d "$CACHE/.bench-generate.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
DATA="$TMP/botchan.jsonl"
ADAPTER="$TMP/adapter"
MERGED="$TMP/merged"

python3 scripts/bench/kaizen_run.py jsonl "$TEXT" "$DATA" 80 || die "building $DATA failed"
python3 scripts/bench/kaizen_run.py train --gguf "$GGUF" --data "$DATA" --out "$ADAPTER" --dtype f32 \
    --threads "$THREADS" --steps 2 --batch-size 1 --max-len 256 --lr 1e-3 >/dev/null \
    || die "training the 2-step adapter failed"
LORA_B=$(python3 scripts/bench/kaizen_run.py lora-b "$ADAPTER") || die "reading $ADAPTER failed"
python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1])["lora_b_max_abs"] <= 0)' "$LORA_B" \
    || die "the 2-step adapter still has lora_B = 0 ($LORA_B): it would not change the model"
target/release/kaizen merge --model "$GGUF" --adapter "$ADAPTER" --out "$MERGED" >/dev/null \
    || die "kaizen merge failed"

run_kaizen() {   # DTYPE VARIANT MODEL [ADAPTER]
    local extra=()
    [[ $# -ge 4 ]] && extra=(--adapter "$4")
    python3 scripts/bench/kaizen_run.py generate --model "$3" "${extra[@]}" --dtype "$1" --variant "$2" \
        --prompt "$PROMPT" --new-tokens "$N" --runs "$RUNS" --threads "$THREADS" | tail -n 1
}

run_torch() {    # DTYPE
    "$PY" scripts/bench/generate_torch.py --gguf "$GGUF" --prompt "$PROMPT" --max-new-tokens "$N" \
        --dtype "$1" --threads "$THREADS" --runs "$RUNS" --json | tail -n 1
}

ROWS=()
for D in f32 bf16; do
    ROWS+=("$(run_kaizen "$D" base "$GGUF")") || die "kaizen generate --dtype $D failed"
    ROWS+=("$(run_kaizen "$D" merged "$MERGED")") || die "kaizen generate --dtype $D (merged model) failed"
    ROWS+=("$(run_kaizen "$D" unmerged "$GGUF" "$ADAPTER")") || die "kaizen generate --dtype $D --adapter failed"
    ROWS+=("$(run_torch "$D")") || die "generate_torch.py --dtype $D failed"
done

python3 - "$THREADS" "$LORA_B" "${ROWS[@]}" <<'PY'
import json, sys
threads, lora_b = sys.argv[1], json.loads(sys.argv[2])
rows = [json.loads(a) for a in sys.argv[3:]]
find = lambda impl, dtype, variant: next(r for r in rows if (r["impl"], r["dtype"], r["variant"]) == (impl, dtype, variant))
n = rows[0]["new_tokens"]
print(f"SmolLM2-135M-Instruct generate, batch 1, greedy, {n} new tokens, {threads} threads; "
      f"LoRA r=8 q_proj,v_proj (2 steps, max |lora_B| {lora_b['lora_b_max_abs']:.1e})")
print("| impl | dtype | variant | s | tokens/s | peak RSS MB | vs pytorch same dtype | vs kaizen base same dtype |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    pt, kb = find("pytorch", r["dtype"], "base"), find("kaizen", r["dtype"], "base")
    vs_kb = f"{r['tokens_per_sec'] / kb['tokens_per_sec']:.2f}x" if r["impl"] == "kaizen" else "-"
    print(f"| {r['impl']} | {r['dtype']} | {r['variant']} | {r['seconds']:.2f} | {r['tokens_per_sec']:.1f} | "
          f"{r['peak_rss_mb']:.0f} | {r['tokens_per_sec'] / pt['tokens_per_sec']:.2f}x | {vs_kb} |")

def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))

for d in ("f32", "bf16"):
    kb, km, ku, pt = (find("kaizen", d, "base"), find("kaizen", d, "merged"), find("kaizen", d, "unmerged"),
                      find("pytorch", d, "base"))
    r_pt = kb["tokens_per_sec"] / pt["tokens_per_sec"]
    r_m = km["tokens_per_sec"] / kb["tokens_per_sec"]
    r_u = ku["tokens_per_sec"] / kb["tokens_per_sec"]
    print(f"{d}: kaizen base / pytorch {r_pt:.2f}x (target >= 1.00: {'ok' if r_pt >= 1.0 else 'MISS'}); "
          f"merged / base {r_m:.2f}x (target 1.00: {'ok' if r_m >= 0.97 else 'MISS'}, 3% noise allowed); "
          f"unmerged / base {r_u:.2f}x (target >= 0.95: {'ok' if r_u >= 0.95 else 'MISS'}); "
          f"peak RSS kaizen base / pytorch {kb['peak_rss_mb'] / pt['peak_rss_mb']:.2f}x")
    i = first_diff(km["ids"], ku["ids"])
    j = first_diff(kb["ids"], ku["ids"])
    print(f"{d}: greedy ids merged vs unmerged: {'identical' if i is None else f'first differ at new token {i + 1}'}; "
          f"adapter vs base: {'identical (the adapter is small)' if j is None else f'first differ at new token {j + 1}'}")
print("kaizen run seconds: " + "; ".join(f"{r['dtype']} {r['variant']} " + " ".join(f"{x:.2f}" for x in r["run_seconds"])
                                         for r in rows if r["impl"] == "kaizen"))
pt = [r for r in rows if r["impl"] == "pytorch"]
print("pytorch: " + "; ".join(f"{r['dtype']} load peak RSS {r['load_peak_rss_mb']:.0f} MB, prefill {r['prefill_tokens']} tokens "
                              f"{r['prefill_seconds']:.2f} s, decode {r['decode_tokens_per_sec']} tokens/s" for r in pt)
      + f"; torch {pt[0]['torch']}, transformers {pt[0]['transformers']}")
kp = {r["prompt_tokens"] for r in rows if r["impl"] == "kaizen"}
if kp != {pt[0]["prefill_tokens"]}:
    print(f"WARNING: prompt lengths differ: kaizen {sorted(kp)} tokens, pytorch {pt[0]['prefill_tokens']} "
          f"(the chat templates disagree; the timings cover different prefills)")
PY
