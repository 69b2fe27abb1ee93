#!/usr/bin/env python3
"""Drives the kaizen binary for the scripts in scripts/bench/ and prints one JSON line per run.
Standard library only (runs under the system python3; the PyTorch side has its own scripts).

    kaizen_run.py jsonl SRC.txt DST.jsonl WORDS
        Cut a text file into {"text"} JSONL lines of at least WORDS words each (whole source
        lines joined by \\n, blank lines dropped, file order), the data format every bench uses.

    kaizen_run.py train --gguf G --data D --out DIR --dtype f32|bf16 --steps N --warmup W
                        --batch-size B --max-len T [--lr 1e-4] [--gradient-checkpointing] [--threads 2]
        `kaizen train` with the benches' fixed LoRA setup (r=8, alpha 16, dropout 0, q_proj,v_proj,
        AdamW, constant lr, clip 1.0, --pack --no-shuffle). Prints
          {"impl": "kaizen", "dtype", "variant", "s_step", "tokens_per_sec", "peak_rss_mb", "losses",
           "grad_norms", "step_seconds", "wall_seconds", "trainable_params", "all_params",
           "adapter_tensors", "adapter_params", "lora_only", "lora_only_why", "run_dtype", ...}
        s_step = median over steps after the warm-up of B*T / tokens_per_sec (metrics.jsonl).
        Checks that run.json records the requested --dtype and --gradient-checkpointing (a flag
        the binary silently ignored would make the row meaningless). lora_only is true when the
        trainable count on stderr equals the element count of the saved adapter, every saved
        tensor is a lora_A/lora_B weight, and the modules are exactly run.json's target modules.

    kaizen_run.py generate --model M [--adapter A] --dtype f32|bf16 --prompt P --new-tokens N
                           [--runs 3] [--threads 2] [--variant base]
        `kaizen generate --chat --greedy --min-new-tokens N --max-new-tokens N --json`, --runs
        fresh processes; reports the fastest run's seconds (prefill + decoding, load excluded).
          {"impl": "kaizen", "dtype", "variant", "new_tokens", "seconds", "tokens_per_sec",
           "peak_rss_mb", "ids", "run_seconds"}

    kaizen_run.py lora-b DIR
        Prints {"lora_b_tensors", "lora_b_max_abs"} of DIR/adapter_model.safetensors (F32 only):
        whether a trained adapter really changes the model (B = 0 at initialisation).

peak_rss_mb is ru_maxrss of the kaizen child processes (getrusage(RUSAGE_CHILDREN) of this
driver, whose only children they are), load included; for generate, the largest of the runs.
"""

import argparse
import array
import json
import os
import re
import resource
import statistics
import struct
import subprocess
import sys
import time

KAIZEN = os.environ.get("KAIZEN_BIN", "target/release/kaizen")


def die(msg):
    sys.exit(f"kaizen_run: error: {msg}")


def child_peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def env_with_threads(threads):
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(threads)
    return env


def cmd_jsonl(a):
    chunks, cur, n = [], [], 0
    with open(a.src, encoding="utf-8-sig") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            cur.append(line)
            n += len(line.split())
            if n >= a.words:
                chunks.append("\n".join(cur))
                cur, n = [], 0
    if cur:
        chunks.append("\n".join(cur))
    with open(a.dst, "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps({"text": c}, ensure_ascii=False) + "\n")


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def check_lora_only(out, trainable, run):
    """(lora_only, why, n_tensors, n_params) for the adapter kaizen wrote to `out`."""
    try:
        h = safetensors_header(os.path.join(out, "adapter_model.safetensors"))
    except (OSError, ValueError, struct.error) as e:
        return False, f"cannot read {out}/adapter_model.safetensors: {e}", 0, 0
    n_params = sum(_numel(v["shape"]) for v in h.values())
    pat = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
    modules, bad = set(), []
    for k in h:
        m = pat.match(k)
        if m:
            modules.add(m.group(1))
        else:
            bad.append(k)
    targets = set(run.get("adapter", {}).get("target_modules") or [])
    if run.get("method") != "lora":
        return False, f"run.json method is {run.get('method')!r}, not lora", len(h), n_params
    if bad:
        return False, f"non-LoRA tensors saved: {bad[:3]}", len(h), n_params
    if trainable is None:
        return False, "no 'trainable params: N' line on stderr", len(h), n_params
    if trainable != n_params:
        return False, f"stderr says {trainable} trainable, the adapter holds {n_params}", len(h), n_params
    if targets and modules != targets:
        return False, f"adapter modules {len(modules)} differ from run.json target_modules {len(targets)}", len(h), n_params
    if any(not re.search(r"\.(q_proj|v_proj)$", m) for m in modules):
        return False, "adapter on modules other than q_proj/v_proj", len(h), n_params
    return True, f"{len(h)} tensors, all lora_A/lora_B of {len(modules)} q_proj/v_proj modules", len(h), n_params


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def cmd_lora_b(a):
    path = os.path.join(a.dir, "adapter_model.safetensors")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h = json.loads(f.read(n))
            body = f.read()
    except (OSError, ValueError, struct.error) as e:
        die(f"cannot read {path}: {e}")
    h.pop("__metadata__", None)
    count, peak = 0, 0.0
    for k, v in h.items():
        if ".lora_B." not in k:
            continue
        if v["dtype"] != "F32":
            die(f"{path}: {k} is {v['dtype']}, this check reads F32 only")
        lo, hi = v["data_offsets"]
        vals = array.array("f", body[lo:hi])
        if sys.byteorder != "little":
            vals.byteswap()
        count += 1
        peak = max(peak, max((abs(x) for x in vals), default=0.0))
    print(json.dumps({"lora_b_tensors": count, "lora_b_max_abs": peak}), flush=True)


def cmd_train(a):
    cmd = [KAIZEN, "train", "--model", a.gguf, "--data", a.data, "--out", a.out, "--overwrite",
           "--max-len", str(a.max_len), "--pack", "--batch-size", str(a.batch_size), "--r", "8",
           "--lora-alpha", "16", "--lora-dropout", "0", "--target-modules", "q_proj,v_proj",
           "--lr", str(a.lr), "--lr-schedule", "constant", "--max-grad-norm", "1.0",
           "--max-steps", str(a.steps), "--no-shuffle", "--dtype", a.dtype]
    if a.quantize:
        cmd += ["--quantize", a.quantize]
    if a.compute:
        cmd += ["--compute", a.compute]
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env_with_threads(a.threads))
    wall = time.perf_counter() - t
    if p.returncode != 0:
        die(f"kaizen train failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-4000:]}")
    for line in p.stderr.splitlines():
        if line.startswith("warning"):
            print(f"kaizen: {line}", file=sys.stderr)
    m = re.search(r"trainable params: (\d+) \|\| all params: (\d+)", p.stderr)
    trainable, all_params = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    try:
        run = json.load(open(os.path.join(a.out, "run.json")))
        logs = [json.loads(l) for l in open(os.path.join(a.out, "metrics.jsonl")) if l.strip()]
    except (OSError, ValueError) as e:
        die(f"cannot read kaizen's run.json / metrics.jsonl in {a.out}: {e}")
    if run.get("dtype", "f32") != a.dtype:
        die(f"asked for --dtype {a.dtype}, {a.out}/run.json records {run.get('dtype')!r}")
    if bool(run.get("gradient_checkpointing")) != a.gradient_checkpointing:
        die(f"--gradient-checkpointing {a.gradient_checkpointing}, run.json records "
            f"{run.get('gradient_checkpointing')!r}")
    logs = [r for r in logs if "loss" in r]
    if len(logs) != a.steps:
        die(f"{a.out}/metrics.jsonl has {len(logs)} step lines, expected {a.steps}")
    positions = a.batch_size * a.max_len
    secs = [positions / r["tokens_per_sec"] for r in logs]
    s_step = statistics.median(secs[a.warmup:])
    lora_only, why, n_tensors, n_params = check_lora_only(a.out, trainable, run)
    print(json.dumps({
        "impl": "kaizen", "dtype": a.dtype, "quantize": a.quantize, "compute": a.compute,
        "variant": "gc" if a.gradient_checkpointing else "plain",
        "s_step": s_step, "tokens_per_sec": positions / s_step, "peak_rss_mb": child_peak_rss_mb(),
        "losses": [r["loss"] for r in logs], "grad_norms": [r["grad_norm"] for r in logs],
        "step_seconds": secs, "wall_seconds": wall, "trainable_params": trainable,
        "all_params": all_params, "adapter_tensors": n_tensors, "adapter_params": n_params,
        "lora_only": lora_only, "lora_only_why": why, "run_dtype": run.get("dtype"),
        "gradient_checkpointing": bool(run.get("gradient_checkpointing")),
        "batch_size": a.batch_size, "max_len": a.max_len, "steps": a.steps, "warmup": a.warmup,
    }), flush=True)


def cmd_generate(a):
    n = str(a.new_tokens)
    cmd = [KAIZEN, "generate", "--model", a.model, "--prompt", a.prompt, "--chat", "--greedy",
           "--max-new-tokens", n, "--min-new-tokens", n, "--json", "--dtype", a.dtype]
    if a.adapter:
        cmd += ["--adapter", a.adapter]
    best, times = None, []
    for _ in range(a.runs):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env_with_threads(a.threads))
        if p.returncode != 0:
            die(f"kaizen generate failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-4000:]}")
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError) as e:
            die(f"kaizen generate --json printed no JSON line ({e}): {p.stdout[-500:]}")
        if len(r["ids"]) != a.new_tokens:
            die(f"kaizen generate produced {len(r['ids'])} tokens, expected {a.new_tokens}")
        times.append(r["seconds"])
        best = r if best is None or r["seconds"] < best["seconds"] else best
    print(json.dumps({
        "impl": "kaizen", "dtype": a.dtype, "quantize": a.quantize, "compute": a.compute,
        "variant": a.variant, "new_tokens": len(best["ids"]),
        "seconds": best["seconds"], "tokens_per_sec": best["tokens_per_sec"],
        "peak_rss_mb": child_peak_rss_mb(), "ids": best["ids"], "prompt_tokens": best.get("prompt_tokens"),
        "run_seconds": times,
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    j = sub.add_parser("jsonl")
    j.add_argument("src")
    j.add_argument("dst")
    j.add_argument("words", type=int)

    t = sub.add_parser("train")
    t.add_argument("--gguf", required=True, help="the model: a GGUF file or an HF directory")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument("--batch-size", type=int, required=True)
    t.add_argument("--max-len", type=int, required=True)
    t.add_argument("--lr", default="1e-4")
    t.add_argument("--quantize", help="kaizen train --quantize TYPE (the frozen base held quantized)")
    t.add_argument("--compute", help="kaizen train --compute (int8)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--threads", type=int, default=2)

    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter")
    g.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    g.add_argument("--prompt", required=True)
    g.add_argument("--new-tokens", type=int, required=True)
    g.add_argument("--runs", type=int, default=3)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--variant", default="base", help="label for the table: base, merged, unmerged")

    lb = sub.add_parser("lora-b")
    lb.add_argument("dir")

    a = ap.parse_args()
    if a.cmd == "train" and not (0 <= a.warmup < a.steps):
        ap.error("train: need 0 <= --warmup < --steps")
    if a.cmd == "generate" and (a.runs < 1 or a.new_tokens < 1):
        ap.error("generate: --runs and --new-tokens must be >= 1")
    {"jsonl": cmd_jsonl, "train": cmd_train, "generate": cmd_generate, "lora-b": cmd_lora_b}[a.cmd](a)


if __name__ == "__main__":
    main()
