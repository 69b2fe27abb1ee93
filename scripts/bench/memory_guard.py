#!/usr/bin/env python3
"""The memory guard's estimate against the measured peak, for every method.

    python3 scripts/bench/memory_guard.py [--model GGUF_OR_DIR] [--rows NAME,NAME] [--steps 2]

Runs `kaizen train` (target/release/kaizen, or KAIZEN_BIN) once per row on the real model
(default: SmolLM2-135M-Instruct, the GGUF dequantized unless the row says otherwise), batches of
--pack'ed botchan.txt so every row is full length, and compares the estimate the run prints
("memory: about X (...)") with the process's peak RSS (getrusage of the child, load included).
Prints a Markdown table; exits 1 if an estimate is below its measured peak by more than 10% or
above it by more than 50% (the guard must not let a run that does not fit start, and should not
refuse one that fits by much). Standard library only. Runs take 5-30 s each on 2 cores.
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile

KAIZEN = os.environ.get("KAIZEN_BIN", "target/release/kaizen")
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# name: (batch, max_len, extra kaizen train arguments)
ROWS = {
    "lora": (8, 256, []),
    "lora+gc": (8, 256, ["--gradient-checkpointing"]),
    "lora-all+dropout": (8, 256, ["--target-modules", ALL_LINEAR, "--lora-dropout", "0.1"]),
    "lora-long": (1, 2048, []),
    "lora-bf16": (4, 512, ["--dtype", "bf16"]),
    "qlora-gguf": (8, 256, ["--quantize", "q4_k"]),
    "qlora-nf4": (8, 256, ["--quantize", "nf4", "--target-modules", ALL_LINEAR]),
    "dora": (4, 256, ["--use-dora"]),
    "ia3": (8, 256, ["--method", "ia3"]),
    "adapter": (8, 256, ["--method", "adapter"]),
    "prompt": (8, 256, ["--method", "prompt"]),
    "p-tuning": (8, 256, ["--method", "p-tuning"]),
    "prefix": (8, 256, ["--method", "prefix"]),
    "full": (4, 256, ["--method", "full"]),
    "full+gc": (4, 256, ["--method", "full", "--gradient-checkpointing"]),
    # rinna/japanese-gpt-neox-3.6b's shapes with random weights (scripts/bench/make_scale_model.py
    # rinna36 --out cache/scale/rinna36): not in the default rows, a step takes about a minute.
    "rinna36-bf16": (1, 128, ["--dtype", "bf16", "--model", "cache/scale/rinna36"]),
    "rinna36-nf4": (1, 128, ["--quantize", "nf4", "--model", "cache/scale/rinna36"]),
}
DEFAULT_ROWS = [n for n in ROWS if not n.startswith("rinna36")]
UNITS = {"MiB": 1 << 20, "GiB": 1 << 30}


def text_rows(src, dst, words=80):
    import json

    out, cur = [], []
    for line in open(src, encoding="utf-8"):
        if line.strip():
            cur.append(line.strip())
            if sum(len(c.split()) for c in cur) >= words:
                out.append(json.dumps({"text": "\n".join(cur)}))
                cur = []
    open(dst, "w").write("\n".join(out) + "\n")


def run(model, data, out, steps, batch, max_len, extra):
    if "--model" in extra:  # the row's own model
        i = extra.index("--model")
        model, extra = extra[i + 1], extra[:i] + extra[i + 2:]
    cmd = [KAIZEN, "train", "--model", model, "--data", data, "--out", out, "--overwrite",
           "--max-steps", str(steps), "--batch-size", str(batch), "--max-len", str(max_len),
           "--pack", "--no-shuffle", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if p.returncode != 0:
        sys.exit(f"memory_guard: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"memory: about ([\d.]+) (MiB|GiB) \(([^)]*)\)", p.stderr)
    if not m:
        sys.exit(f"memory_guard: no 'memory:' line on stderr of {' '.join(cmd)}")
    return float(m.group(1)) * UNITS[m.group(2)], peak, m.group(3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cache/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", default="cache/botchan.txt")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # one row in this process, so ru_maxrss is this row's alone
        batch, max_len, extra = ROWS[a.one]
        with tempfile.TemporaryDirectory(dir="cache") as tmp:
            data = os.path.join(tmp, "data.jsonl")
            text_rows(a.text, data)
            est, peak, parts = run(a.model, data, os.path.join(tmp, "out"), a.steps, batch, max_len, extra)
        print(f"{est}\t{peak}\t{parts}")
        return
    names = a.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"memory_guard: unknown rows {unknown}; known: {', '.join(ROWS)}")
    print(f"{os.path.basename(a.model)}, {a.steps} steps per run; estimate = the run's 'memory:' "
          "line, peak = peak RSS of the process, load included\n")
    print("| row | batch x len | flags | estimate | peak RSS | estimate / peak | estimate's parts |")
    print("|---|---|---|---|---|---|---|")
    bad = []
    for n in names:
        batch, max_len, extra = ROWS[n]
        p = subprocess.run([sys.executable, __file__, "--model", a.model, "--text", a.text,
                            "--steps", str(a.steps), "--one", n], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr)
        est, peak, parts = p.stdout.strip().split("\t")
        est, peak = float(est), float(peak)
        ratio = est / peak
        if not 0.9 <= ratio <= 1.5:
            bad.append(n)
        print(f"| {n} | {batch} x {max_len} | {' '.join(extra) or '-'} | {est / 2**20:.0f} MiB | "
              f"{peak / 2**20:.0f} MiB | {ratio:.2f} | {parts} |", flush=True)
    if bad:
        print(f"\nOUT OF BOUNDS (estimate/peak outside 0.90..1.50): {', '.join(bad)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
