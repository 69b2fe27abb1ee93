#!/usr/bin/env bash
# Data-parallel training on this machine: SmolLM2-135M-Instruct LoRA (the GGUF dequantized; r=8,
# alpha 16, q_proj,v_proj; AdamW lr 1e-4 constant; rows of 256 packed tokens of botchan.txt, file
# order), the same global batch of 2 x BATCH rows per step, side by side in one run:
#   np1: one process, 2 threads, --batch-size BATCH --grad-accum 2
#   np2: mpirun -np 2, 1 thread per rank, --batch-size BATCH (each rank one micro-batch)
# Prints tokens/s (median over the steps after WARMUP, all ranks' tokens), the all-reduce's bytes
# per step (from kaizen's start-up line) and seconds (median of metrics.jsonl's
# allreduce_seconds: the call's time, waiting for the slower rank included), and how far the two
# adapters are apart (they differ in threads, so in f32 rounding only).
#   bash scripts/bench/mpi.sh [STEPS] [BATCH]       (default 7 steps, 2 untimed; BATCH 4)
#   DTYPE=f32 bash scripts/bench/mpi.sh             (default bf16 base)
# Needs the release binary with the mpi feature (built here) and Open MPI (scripts/install_mpi.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS="${1:-7}"
BATCH="${2:-4}"
WARMUP=2
DTYPE="${DTYPE:-bf16}"
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
die() { echo "bench/mpi: error: $*" >&2; exit 1; }
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -gt "$WARMUP" ]] || die "STEPS must be an integer above $WARMUP"
bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed"
bash scripts/install_mpi.sh
cargo build --release --locked -p kaizen-cli --features mpi || die "cargo build failed"
KAIZEN="${CARGO_TARGET_DIR:-target}/release/kaizen"

TMP="$(mktemp -d "$CACHE/.bench-mpi.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
python3 scripts/bench/kaizen_run.py jsonl "$CACHE/botchan.txt" "$TMP/data.jsonl" 80
ARGS=(train --model "$GGUF" --data "$TMP/data.jsonl" --max-len 256 --pack --no-shuffle
    --batch-size "$BATCH" --r 8 --lora-alpha 16 --target-modules q_proj,v_proj --lr 1e-4
    --lr-schedule constant --max-steps "$STEPS" --dtype "$DTYPE")
echo "np1: 1 process x 2 threads, --grad-accum 2" >&2
RAYON_NUM_THREADS=2 "$KAIZEN" "${ARGS[@]}" --grad-accum 2 --out "$TMP/np1" 2>"$TMP/np1.err" >&2
echo "np2: mpirun -np 2, 1 thread each" >&2
mpirun --allow-run-as-root --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 \
    "$KAIZEN" "${ARGS[@]}" --out "$TMP/np2" 2>"$TMP/np2.err" >&2
python3 - "$TMP" "$WARMUP" "$BATCH" "$DTYPE" <<'PY'
import json, re, statistics, struct, sys
tmp, warmup, batch, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def steps(run):
    lines = [json.loads(l) for l in open(f"{tmp}/{run}/metrics.jsonl")]
    return [l for l in lines if "loss" in l][warmup:]
def tensors(run):
    raw = open(f"{tmp}/{run}/adapter_model.safetensors", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    return {k: struct.unpack(f"<{(v['data_offsets'][1] - v['data_offsets'][0]) // 4}f",
                             data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in head.items() if k != "__metadata__"}
one, two = steps("np1"), steps("np2")
t1 = statistics.median(s["tokens_per_sec"] for s in one)
t2 = statistics.median(s["tokens_per_sec"] for s in two)
reduce = statistics.median(s["allreduce_seconds"] for s in two)
line = next(l for l in open(f"{tmp}/np2.err") if "all-reduce of" in l)
nbytes = int(re.search(r"all-reduce of (\d+) bytes", line).group(1))
a, b = tensors("np1"), tensors("np2")
rel = max(max(abs(x - y) for x, y in zip(a[k], b[k])) / max(max(abs(x) for x in a[k]), 1e-30) for k in a)
s2 = statistics.median(s["elapsed"] for s in two)
print(f"SmolLM2-135M LoRA, {dtype} base, global batch 2 x {batch} x 256 tokens, {len(one)} timed steps")
print("| run | tokens/s | s/step | all-reduce bytes/step | all-reduce s/step (median) |")
print("|---|---|---|---|---|")
print(f"| 1 process, 2 threads, --grad-accum 2 | {t1:.1f} | {2 * batch * 256 / t1:.2f} | - | - |")
print(f"| mpirun -np 2, 1 thread each | {t2:.1f} | {2 * batch * 256 / t2:.2f} | {nbytes} | {reduce:.4f} |")
print(f"np2 / np1 tokens/s: {t2 / t1:.2f}x; adapters' largest difference, relative to each tensor's "
      f"largest value: {rel:.2e}")
print("losses np1:", " ".join(f"{s['loss']:.5f}" for s in one))
print("losses np2:", " ".join(f"{s['loss']:.5f}" for s in two))
PY
