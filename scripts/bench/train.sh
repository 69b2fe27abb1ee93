#!/usr/bin/env bash
# LoRA training speed, kaizen vs PyTorch + PEFT, on SmolLM2-135M-Instruct (GGUF dequantized to
# f32; LoRA r=8 alpha=16 on q_proj,v_proj; AdamW lr 1e-4 constant, clip 1.0; batch 4 x 256 packed
# tokens of botchan.txt, no padding), in one run on this machine. Prints a table.
#   bash scripts/bench/train.sh [STEPS] [THREADS]      (default 7 steps, the first 2 untimed; 2 threads)
# Needs the Python side: python3 -m venv .venv-bench && .venv-bench/bin/pip install -r scripts/reference/requirements.txt
# (or PYTHON=/path/to/python with torch, transformers, peft and gguf).
#
# Both sides train on the same rows: botchan.txt is cut into {"text"} lines of about 80 words
# (under 256 tokens, so --max-len never truncates one), each tokenized with BOS/EOS as kaizen
# does, concatenated and split into rows of 256 tokens (kaizen: --pack; train_torch.py copies
# it), taken in file order (--no-shuffle). So the first-step losses (LoRA B = 0) must agree.
# s/step is the median over the timed steps (kaizen: B*T / tokens_per_sec of metrics.jsonl;
# PyTorch: wall time of forward+backward+clip+AdamW); tokens/s = B*T / s_step; GFLOP/s =
# useful FLOPs of a step (train_torch.py flops_per_step: 4*N*T + 6*P_lora*T + 12*B*L*S^2*d,
# about 608 GFLOP here) / s_step; peak RSS is the whole process's, load included.
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

die() { echo "bench/train: error: $*" >&2; exit 1; }
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -gt "$WARMUP" ]] || die "STEPS must be an integer above $WARMUP (got '$STEPS')"
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
command -v python3 >/dev/null || die "python3 not found (used to drive kaizen and print the table)"
[[ -x "$PY" ]] || command -v "$PY" >/dev/null || die "no Python at '$PY'; set PYTHON=... or create .venv-bench (see the header of $0)"
"$PY" -c "import torch, transformers, peft, gguf" 2>/dev/null \
    || die "$PY lacks torch/transformers/peft/gguf: $PY -m pip install -r scripts/reference/requirements.txt"

bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed (see above)"
cargo build --release --locked -p kaizen-cli || die "cargo build failed"

TMP="$(mktemp -d "$CACHE/.bench-train.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
DATA="$TMP/botchan.jsonl"

# botchan.txt -> {"text"} lines of at least WORDS_PER_LINE words (whole source lines, joined by \n).
python3 - "$TEXT" "$DATA" "$WORDS_PER_LINE" <<'PY'
import json, sys
src, dst, words = sys.argv[1], sys.argv[2], int(sys.argv[3])
chunks, cur, n = [], [], 0
with open(src, encoding="utf-8-sig") as f:
    for line in f:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        cur.append(line)
        n += len(line.split())
        if n >= words:
            chunks.append("\n".join(cur))
            cur, n = [], 0
if cur:
    chunks.append("\n".join(cur))
with open(dst, "w", encoding="utf-8") as f:
    for c in chunks:
        f.write(json.dumps({"text": c}, ensure_ascii=False) + "\n")
PY

run_kaizen() {
    RAYON_NUM_THREADS=$THREADS python3 - "$GGUF" "$DATA" "$TMP/kaizen-out" "$STEPS" "$WARMUP" "$BATCH" "$SEQ" <<'PY'
import json, resource, statistics, subprocess, sys, time
gguf, data, out, steps, warmup, batch, seq = sys.argv[1:4] + [int(v) for v in sys.argv[4:]]
cmd = ["target/release/kaizen", "train", "--model", gguf, "--data", data, "--out", out, "--overwrite",
       "--max-len", str(seq), "--pack", "--batch-size", str(batch), "--r", "8", "--lora-alpha", "16",
       "--lora-dropout", "0", "--target-modules", "q_proj,v_proj", "--lr", "1e-4", "--lr-schedule", "constant",
       "--max-grad-norm", "1.0", "--max-steps", str(steps), "--no-shuffle"]
t = time.perf_counter()
p = subprocess.run(cmd, capture_output=True, text=True)
wall = time.perf_counter() - t
if p.returncode != 0:
    sys.exit(f"bench/train: kaizen train failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
for line in p.stderr.splitlines():
    if line.startswith("warning"):
        print(f"kaizen: {line}", file=sys.stderr)
logs = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if l.strip()]
logs = [r for r in logs if "loss" in r]
if len(logs) != steps:
    sys.exit(f"bench/train: {out}/metrics.jsonl has {len(logs)} step lines, expected {steps}")
secs = [batch * seq / r["tokens_per_sec"] for r in logs]
s_step = statistics.median(secs[warmup:])
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"impl": "kaizen", "dtype": "f32", "s_step": s_step, "tokens_per_sec": batch * seq / s_step,
                  "peak_rss_mb": rss, "losses": [r["loss"] for r in logs],
                  "grad_norms": [r["grad_norm"] for r in logs], "step_seconds": secs, "wall_seconds": wall}))
PY
}

run_torch() {
    "$PY" scripts/bench/train_torch.py --gguf "$GGUF" --data "$DATA" --dtype "$1" --threads "$THREADS" \
        --steps "$STEPS" --warmup "$WARMUP" --batch-size "$BATCH" --max-len "$SEQ" --json | tail -n 1
}

T=$(run_torch f32) || die "train_torch.py --dtype f32 failed"
K=$(run_kaizen) || die "kaizen run failed"
TB=$(run_torch bf16) || die "train_torch.py --dtype bf16 failed"
python3 - "$K" "$T" "$TB" "$THREADS" "$STEPS" "$WARMUP" <<'PY'
import json, sys
k, t, tb = (json.loads(a) for a in sys.argv[1:4])
threads, steps, warmup = sys.argv[4:7]
gflop = t["gflop_per_step"]
print(f"SmolLM2-135M-Instruct LoRA training (r=8, q_proj,v_proj), batch {t['batch_size']} x {t['max_len']} tokens, "
      f"{threads} threads, {steps} steps ({warmup} warm-up), {gflop:.0f} GFLOP/step")
print("| impl | dtype | s/step | tokens/s | GFLOP/s | peak RSS MB | tokens/s vs PyTorch f32 |")
print("|---|---|---|---|---|---|---|")
for r in (k, t, tb):
    name = "pytorch+peft" if r["impl"] == "pytorch" else r["impl"]
    print(f"| {name} | {r['dtype']} | {r['s_step']:.2f} | {r['tokens_per_sec']:.1f} | {gflop / r['s_step']:.1f} | "
          f"{r['peak_rss_mb']:.0f} | {r['tokens_per_sec'] / t['tokens_per_sec']:.2f}x |")
print(f"kaizen / pytorch f32 tokens/s: {k['tokens_per_sec'] / t['tokens_per_sec']:.2f}x; "
      f"peak RSS: {k['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)
for r in (k, t, tb):
    print(f"{r['impl']:>8} {r['dtype']:>4} loss: {fmt(r['losses'])}")
for r in (k, t, tb):
    print(f"{r['impl']:>8} {r['dtype']:>4} s/step: {' '.join(f'{x:.2f}' for x in r['step_seconds'])}")
print(f"pytorch versions: torch {t['torch']}, transformers {t['transformers']}, peft {t['peft']}, "
      f"attention {t['attn_implementation']}; pytorch load peak RSS {t['load_peak_rss_mb']:.0f} MB (f32), "
      f"{tb['load_peak_rss_mb']:.0f} MB (bf16)")
rel = abs(k["losses"][0] - t["losses"][0]) / abs(t["losses"][0])
if rel > 1e-3:
    print(f"WARNING: first-step losses differ by {rel:.2e} relative: kaizen {k['losses'][0]:.6f}, "
          f"pytorch {t['losses'][0]:.6f} (same rows, LoRA B = 0: they should agree)")
else:
    print(f"first-step loss agrees: kaizen {k['losses'][0]:.6f}, pytorch {t['losses'][0]:.6f} ({rel:.1e} relative)")
PY
