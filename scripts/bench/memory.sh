#!/usr/bin/env bash
# Peak memory of LoRA training against sequence length: kaizen f32, kaizen f32 with
# --gradient-checkpointing, and PyTorch + PEFT f32, on SmolLM2-135M-Instruct (GGUF dequantized to
# f32; LoRA r=8 alpha=16 on q_proj,v_proj, train.sh's setup; batch 1 x L tokens packed from
# botchan.txt, 2 optimizer steps). Prints a table of peak RSS per L and the increment per step in
# L, to show whether memory grows linearly with the sequence (the model's context is 8192).
#   bash scripts/bench/memory.sh [LENS] [THREADS]     (default LENS 256,512,1024,2048; 2 threads)
#   e.g. bash scripts/bench/memory.sh 256,512 2       (a quick check, about 1-2 minutes)
# Takes about 5-8 minutes at the defaults on a quiet 2-core machine: 3 runs per length, one after
# the other (12 in all); a step at 2048 tokens is ~2000 GFLOP (1100 in the linear layers, 870 in
# attention), so a 2-step kaizen run there takes about a minute, the gradient-checkpointing one a
# third longer, PyTorch's about as long plus ~10 s of loading; the shorter lengths add about as
# much again.
# Needs the Python side: python3 -m venv .venv-bench && .venv-bench/bin/pip install -r scripts/reference/requirements.txt
# (or PYTHON=/path/to/python with torch, transformers, peft and gguf).
#
# Peak RSS is ru_maxrss of the whole training process (kaizen: getrusage(RUSAGE_CHILDREN) of its
# driver, scripts/bench/kaizen_run.py), nothing subtracted: it includes the model load, where the
# GGUF is dequantized. For reference the script also prints the load peaks: PyTorch's right after
# loading + get_peft_model (train_torch.py's load_peak_rss_mb), and kaizen's as the peak of a
# `kaizen generate` of 1 token (load + a forward over the ~40-token chat prompt).
# Increment = peak(L) - peak(previous L); per 1k tokens = increment / (L - previous L) * 1024.
# With L doubling, linear growth shows as increments doubling (per-1k-token figure constant);
# quadratic (e.g. materialised S x S attention scores) as increments quadrupling.
# It also checks that only the LoRA tensors train (kaizen's trainable count on stderr = the saved
# adapter's lora_A/lora_B elements, run.json method lora on q_proj/v_proj) and that the first-step
# losses agree across the three runs at each L (same rows, LoRA B = 0).
# Scratch files live in a temporary directory under the cache, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
LENS="${1:-256,512,1024,2048}"
THREADS="${2:-2}"
CONTEXT=8192       # SmolLM2-135M max_position_embeddings
STEPS=2
WARMUP=1           # s/step shown is step 2's
PY="${PYTHON:-.venv-bench/bin/python}"
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT="$CACHE/botchan.txt"

die() { echo "bench/memory: error: $*" >&2; exit 1; }
[[ "$LENS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "LENS must be comma-separated integers, e.g. 256,512 (got '$LENS')"
IFS=, read -r -a LEN_LIST <<<"$LENS"
prev=0
for L in "${LEN_LIST[@]}"; do
    (( L >= 16 && L <= CONTEXT )) || die "sequence length $L is outside 16..$CONTEXT (the model context)"
    (( L > prev )) || die "LENS must be increasing (got '$LENS')"
    prev=$L
done
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
command -v python3 >/dev/null || die "python3 not found (used to drive kaizen and print the table)"
[[ -x "$PY" ]] || command -v "$PY" >/dev/null || die "no Python at '$PY'; set PYTHON=... or create .venv-bench (see the header of $0)"
"$PY" -c "import torch, transformers, peft, gguf" 2>/dev/null \
    || die "$PY lacks torch/transformers/peft/gguf: $PY -m pip install -r scripts/reference/requirements.txt"

bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed (see above)"
cargo build --release --locked -p kaizen-cli || die "cargo build failed"
[[ "$(target/release/kaizen train --help)" == *--gradient-checkpointing* ]] \
    || die "target/release/kaizen train has no --gradient-checkpointing flag (an older build?)"

TMP="$(mktemp -d "$CACHE/.bench-memory.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
DATA="$TMP/botchan.jsonl"
python3 scripts/bench/kaizen_run.py jsonl "$TEXT" "$DATA" 80 || die "building $DATA failed"

run_kaizen() {   # L [--gradient-checkpointing]
    python3 scripts/bench/kaizen_run.py train --gguf "$GGUF" --data "$DATA" --out "$TMP/kaizen-$1" \
        --dtype f32 --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" --batch-size 1 \
        --max-len "$1" --lr 1e-4 "${@:2}" | tail -n 1
}

run_torch() {    # L
    "$PY" scripts/bench/train_torch.py --gguf "$GGUF" --data "$DATA" --dtype f32 --threads "$THREADS" \
        --steps "$STEPS" --warmup "$WARMUP" --batch-size 1 --max-len "$1" --json | tail -n 1
}

LOAD=$(python3 scripts/bench/kaizen_run.py generate --model "$GGUF" --dtype f32 --variant load \
    --prompt "Write a haiku about autumn." --new-tokens 1 --runs 1 --threads "$THREADS" | tail -n 1) \
    || die "kaizen generate (load peak) failed"
ROWS=()
for L in "${LEN_LIST[@]}"; do
    echo "bench/memory: seq len $L ..." >&2
    ROWS+=("$(run_kaizen "$L")") || die "kaizen train --max-len $L failed"
    ROWS+=("$(run_kaizen "$L" --gradient-checkpointing)") || die "kaizen train --max-len $L --gradient-checkpointing failed"
    ROWS+=("$(run_torch "$L")") || die "train_torch.py --max-len $L failed"
done

python3 - "$THREADS" "$LOAD" "${ROWS[@]}" <<'PY'
import json, sys
threads, load = sys.argv[1], json.loads(sys.argv[2])
rows = [json.loads(a) for a in sys.argv[3:]]
key = lambda r: "pytorch" if r["impl"] == "pytorch" else ("kaizen_gc" if r["gradient_checkpointing"] else "kaizen")
names = {"kaizen": "kaizen f32", "kaizen_gc": "kaizen f32 + grad ckpt", "pytorch": "pytorch+peft f32"}
impls = list(names)
by = {(key(r), r["max_len"]): r for r in rows}
lens = sorted({r["max_len"] for r in rows})

print(f"SmolLM2-135M-Instruct LoRA training peak RSS (r=8, q_proj,v_proj), batch 1 x L tokens packed, "
      f"2 steps, {threads} threads; MB, load included")
head = "| seq len | " + " | ".join(f"{names[i]} | +MB | +MB per 1k tok" for i in impls) + " |"
print(head)
print("|---" * (1 + 3 * len(impls)) + "|")
for n, L in enumerate(lens):
    cells = [str(L)]
    for i in impls:
        r = by[(i, L)]
        cells.append(f"{r['peak_rss_mb']:.0f}")
        if n == 0:
            cells += ["-", "-"]
        else:
            p, pl = by[(i, lens[n - 1])]["peak_rss_mb"], lens[n - 1]
            cells += [f"{r['peak_rss_mb'] - p:+.0f}", f"{(r['peak_rss_mb'] - p) / (L - pl) * 1024:+.0f}"]
    print("| " + " | ".join(cells) + " |")
for i in impls:
    inc = [by[(i, b)]["peak_rss_mb"] - by[(i, a)]["peak_rss_mb"] for a, b in zip(lens, lens[1:])]
    ratios = [f"{b / a:.2f}" if a > 0 else "n/a" for a, b in zip(inc, inc[1:])]
    print(f"{names[i]:>22}: increments {' '.join(f'{x:+.0f}' for x in inc) or '-'} MB; "
          f"ratio of successive increments {' '.join(ratios) or '-'} (L doubling: ~2 linear, ~4 quadratic)")
for i in impls:
    print(f"{names[i]:>22} s/step (step 2): "
          + " ".join(f"L={L} {by[(i, L)]['s_step']:.2f}" for L in lens))
t0 = by[("pytorch", lens[0])]
print(f"load peaks: kaizen {load['peak_rss_mb']:.0f} MB (generate of 1 token: load + prompt forward); pytorch "
      + ", ".join(f"{by[('pytorch', L)]['load_peak_rss_mb']:.0f}" for L in lens)
      + f" MB (after from_pretrained + get_peft_model, one per run); attention {t0['attn_implementation']}")
k = by[("kaizen", lens[0])]
print(f"trainable params: kaizen {k['trainable_params']} of {k['all_params']} "
      f"({100 * k['trainable_params'] / k['all_params']:.4f}%), pytorch {t0['trainable_params']}")
bad = [(names[key(r)], r["max_len"], r["lora_only_why"]) for r in rows if r["impl"] == "kaizen" and not r["lora_only"]]
if bad:
    for b in bad:
        print(f"WARNING: {b[0]} L={b[1]}: not only LoRA tensors train: {b[2]}")
else:
    print(f"only LoRA trains in every kaizen run: {k['lora_only_why']}; trainable count = adapter elements "
          f"= {k['adapter_params']}")
for L in lens:
    ks, kg, pt = (by[(i, L)]["losses"][0] for i in impls)
    rel = max(abs(ks - pt), abs(kg - pt)) / abs(pt)
    flag = "" if rel <= 1e-3 else "  WARNING: more than 1e-3 apart"
    print(f"L={L} first-step loss: kaizen {ks:.6f}, kaizen gc {kg:.6f}, pytorch {pt:.6f} "
          f"(max {rel:.1e} relative){flag}")
PY
