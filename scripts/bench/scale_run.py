#!/usr/bin/env python3
"""Row runner and table printer of the scale benchmark (scripts/bench/scale.sh). Standard library
only (runs under the system python3).

    scale_run.py data DST.jsonl --tokens N [--seed 0]
        {"text"} lines of seeded pseudo-words (8-14 words, about 25-55 tokens with the scale
        models' BPE tokenizer, BOS and EOS included: at most 64, so with T >= 64 no line is ever cut), enough lines
        for N tokens with a wide margin. The text is only a source of token ids.

    scale_run.py row --row ROW --model DIR --data D --batch B --seq T --steps N --warmup W
                     --threads K --mem-gb G --scratch DIR [--python PY] [--kaizen BIN] [--force]
                     [--kaizen-extra 'FLAGS']
        One benchmark row, ROW one of ROWS below. Prints exactly one JSON line: the row's result,
        or {"row", "skipped": why} / {"row", "error": why} (the exit status is 0 either way, so a
        failing row never stops the driver).

    scale_run.py table --shape S --commit C --threads K --steps N --warmup W FILE.jsonl
        The markdown table of the rows in FILE (one JSON line each, in run order).

Memory guard. Before a row runs, its memory is estimated from config.json (estimate() below:
frozen weights x bytes per weight for the row's storage + saved activations + logits + runtime
overhead, in decimal GB). A row whose estimate exceeds --mem-gb is skipped ("does not fit 24 GB");
one whose estimate exceeds the memory available now (MemAvailable - 0.5 GB) is skipped too,
unless --force. While a row runs, a watchdog polls every 50 ms the anonymous resident memory
(RssAnon + RssShmem of /proc/PID/status, summed over the process and its descendants; file pages
of mmapped checkpoints are excluded, the kernel can drop those) and kills the process group when
it exceeds min(--mem-gb, MemAvailable at the start - 0.5 GB): a wrong estimate ends the row,
never the machine (no swap here: the kernel's OOM killer could pick another process).
`ulimit -v` is not used: both sides map the multi-GB checkpoint files and reserve address space
far beyond what they touch, so a virtual-memory cap would fail rows that fit.

Peak RSS reported = ru_maxrss of the row's process (os.wait4), load included, everything resident
(mmapped file pages too), as train.sh and memory.sh report it; peak_anon_gb = the watchdog's
highest sample of anonymous memory.
"""

import argparse
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9

# row id -> (label, impl, mode): mode is scale_torch.py's --mode, or kaizen's (dtype, quantize,
# quantize-embeddings, compute).
ROWS = {
    "torch-f32": ("pytorch+peft f32", "pytorch", "f32"),
    "torch-bf16": ("pytorch+peft bf16", "pytorch", "bf16"),
    "torch-bnb4": ("pytorch+peft+bnb nf4", "pytorch", "bnb4"),
    "kaizen-f32": ("kaizen f32", "kaizen", ("f32", None, None, None)),
    "kaizen-bf16": ("kaizen bf16", "kaizen", ("bf16", None, None, None)),
    "kaizen-q8_0": ("kaizen q8_0", "kaizen", ("bf16", "q8_0", None, None)),
    "kaizen-q4_k": ("kaizen q4_k", "kaizen", ("bf16", "q4_k", None, None)),
    "kaizen-nf4": ("kaizen nf4", "kaizen", ("bf16", "nf4", None, None)),
    # --compute int8: integer products through the quantized base.
    "kaizen-q8_0-int8": ("kaizen q8_0 int8", "kaizen", ("bf16", "q8_0", None, "int8")),
    "kaizen-q4_k-int8": ("kaizen q4_k int8", "kaizen", ("bf16", "q4_k", None, "int8")),
    "kaizen-nf4-int8": ("kaizen nf4 int8", "kaizen", ("bf16", "nf4", None, "int8")),
    # llama.cpp's Q4_K_M types for the table and head: --quantize-embeddings q4_k,q6_k.
    "kaizen-q4_k_m": ("kaizen q4_k_m", "kaizen", ("bf16", "q4_k", "q4_k,q6_k", None)),
}
# Bytes per frozen linear weight (quantized blocks: q8_0 34 B / 32, q4_k 144 B / 256, NF4 4 bits
# + one f32 absmax per 64).
QBYTES = {"q8_0": 34 / 32, "q4_k": 144 / 256, "q6_k": 210 / 256, "nf4": 0.5 + 4 / 64, "bnb4": 0.5 + 4 / 64}
TARGETS = {"gpt_neox": ["query_key_value"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# First-step loss reference of each row (same model numerics: the rows should agree closely).
LOSS_REF = {"torch-f32": None, "torch-bf16": "torch-f32", "torch-bnb4": "torch-bf16",
            "kaizen-f32": "torch-f32", "kaizen-bf16": "torch-bf16", "kaizen-q8_0": "torch-bf16",
            "kaizen-q4_k": "torch-bf16", "kaizen-nf4": "torch-bnb4", "kaizen-q4_k_m": "torch-bf16",
            "kaizen-q8_0-int8": "torch-bf16", "kaizen-q4_k-int8": "torch-bf16",
            "kaizen-nf4-int8": "torch-bnb4"}


def die(msg):
    sys.exit(f"scale_run: error: {msg}")


# ---------------------------------------------------------------------------------------------
# data

SYLLABLES = ("ka ki ku ke ko sa shi su se so ta chi tsu te to na ni nu ne no ha hi fu he ho ma mi "
             "mu me mo ya yu yo ra ri ru re ro wa n the and of to in is was that").split()


def cmd_data(a):
    r = random.Random(a.seed)
    lines = math.ceil(a.tokens / 20) + 64  # lines hold about 25-50 tokens
    with open(a.dst, "w", encoding="utf-8") as f:
        for _ in range(lines):
            words = [''.join(r.choice(SYLLABLES) for _ in range(r.randint(1, 3))) for _ in range(r.randint(8, 14))]
            f.write(json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n")


# ---------------------------------------------------------------------------------------------
# memory estimate

def model_sizes(cfg):
    """(linear weights in the decoder layers, embedding, head, other) parameter counts."""
    d, L, V, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    h = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // h
    if cfg["model_type"] == "gpt_neox":
        lin = L * (3 * d * d + d * d + 2 * d * ff)
        other = L * (3 * d + d + ff + d + 4 * d) + 2 * d
    else:
        kv = cfg.get("num_key_value_heads", h) * hd
        lin = L * (d * h * hd * 2 + 2 * d * kv + 3 * d * ff)
        other = L * 2 * d + d
    head = 0 if cfg.get("tie_word_embeddings") else V * d
    return lin, V * d, head, other


def estimate(cfg, row, batch, seq, checkpointing=False):
    """Estimated peak anonymous memory of a row in bytes, and the parts (GB) as a string.

    weights: linear x bytes(mode) + embedding/head/norms x bytes(base dtype); bnb leaves the head
      unquantized; kaizen's quantized rows keep embedding and head in bf16 unless the row quantizes
      them too (kaizen-q4_k_m: Q4_K table, Q6_K head).
    activations (saved for backward) per token and layer: PyTorch (16 d + 3-4 ff) elements of the
      compute dtype + the f32 copies of the LoRA inputs; kaizen (8 d + 3 ff) f32 elements
      (calibrated on memory.sh's SmolLM2 runs: kaizen +0.75 GB per 1k tokens at 30 layers,
      PyTorch +1.8-2.6); under kaizen's --gradient-checkpointing (`checkpointing`) each layer's
      f32 input and one layer's tape. Attention scores of one layer (B H T^2 f32, x3) transient.
    logits: B T V x (3 f32 + 1 compute dtype) (logits, log-softmax, their gradient).
    overhead: 1.2 GB PyTorch (runtime, libraries), 0.4 GB kaizen.
    """
    _, impl, mode = ROWS[row]
    d, L, V, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    h = cfg["num_attention_heads"]
    lin, emb, head, other = model_sizes(cfg)
    tok = batch * seq
    ntarget = len(TARGETS.get(cfg["model_type"], ["q", "v"]))
    n_ff = 3 if cfg["model_type"] == "gpt_neox" else 4
    if impl == "pytorch":
        wb = {"f32": 4, "bf16": 2, "bnb4": QBYTES["bnb4"]}[mode]
        rest = 4 if mode == "f32" else 2
        eb = 4 if mode == "f32" else 2
        weights = lin * wb + (emb + head + other) * rest
        act = tok * L * ((16 * d + n_ff * ff) * eb + (ntarget * d * 4 if mode != "f32" else 0))
        overhead = 1.2 * GB
    else:
        dtype, quant, embq, _ = mode
        rest = 4 if dtype == "f32" else 2
        wb = QBYTES[quant] if quant else rest
        eq, hq = (QBYTES[t] for t in embq.split(",")) if embq else (rest, rest)
        weights = lin * wb + emb * eq + head * hq + other * rest
        act = tok * (L * d + (8 * d + 3 * ff) if checkpointing else L * (8 * d + 3 * ff)) * 4
        eb = 4
        overhead = 0.4 * GB
    attn = batch * h * seq * seq * 4 * 3
    logits = tok * V * (12 + eb)
    total = weights + act + attn + logits + overhead
    parts = (f"weights {weights / GB:.1f} + activations {act / GB:.1f} + attention {attn / GB:.1f} + "
             f"logits {logits / GB:.1f} + overhead {overhead / GB:.1f}")
    return total, parts


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# watchdog

def _anon_bytes(pid):
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def _tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def run_guarded(cmd, limit, env=None, stdout_path=None, stderr_path=None):
    """Runs cmd in its own process group; kills the group when its anonymous memory > limit.
    Returns (returncode, ru_maxrss bytes, peak anon bytes sampled, killed reason or None, seconds)."""
    out = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL
    err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
    peak, killed = 0, None
    try:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            anon = sum(_anon_bytes(q) for q in _tree(p.pid))
            peak = max(peak, anon)
            if anon > limit and killed is None:
                killed = f"killed by the memory watchdog at {anon / GB:.1f} GB anonymous RSS (limit {limit / GB:.1f} GB)"
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.05)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        raise
    finally:
        for fh in (out, err):
            if fh is not subprocess.DEVNULL:
                fh.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_maxrss * 1024, peak, killed, time.perf_counter() - t0


def error_summary(path):
    """The telling lines of a failed row's stderr: a Rust panic's location and message, kaizen's
    `error:` line, or a Python traceback's last line; else the last line."""
    try:
        lines = [l.rstrip() for l in open(path, errors="replace")]
    except OSError:
        return "(no stderr)"
    lines = [l for l in lines if l.strip() and "%|" not in l and "it/s]" not in l]
    for i, l in enumerate(lines):
        if "panicked at" in l:
            return " ".join(x.strip() for x in lines[i:i + 2])
    errs = [l for l in lines if l.startswith("error")]
    if errs:
        return errs[-1]
    py = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", l)]
    if py:
        return py[-1]
    return lines[-1] if lines else "(empty stderr)"


def tail(path, n=1500):
    try:
        with open(path, errors="replace") as f:
            s = f.read()
    except OSError:
        return ""
    s = "\n".join(l for l in s.splitlines() if "%|" not in l and "it/s]" not in l)
    return s[-n:]


# ---------------------------------------------------------------------------------------------
# rows

def cmd_row(a):
    label, impl, mode = ROWS[a.row]
    if impl == "kaizen" and a.kaizen_extra.strip():
        label = f"{label} {a.kaizen_extra.strip()}"
    base = {"row": a.row, "label": label, "impl": impl, "batch_size": a.batch, "max_len": a.seq}
    try:
        cfg = json.load(open(os.path.join(a.model, "config.json")))
    except (OSError, ValueError) as e:
        return emit({**base, "error": f"cannot read {a.model}/config.json: {e}"})
    checkpointing = impl == "kaizen" and "--gradient-checkpointing" in shlex.split(a.kaizen_extra)
    est, parts = estimate(cfg, a.row, a.batch, a.seq, checkpointing)
    base["est_gb"] = round(est / GB, 2)
    base["est_parts"] = parts
    budget = a.mem_gb * GB
    avail = mem_available() - 0.5 * GB
    if est > budget:
        return emit({**base, "skipped": f"does not fit {a.mem_gb:g} GB (estimate {est / GB:.1f} GB: {parts})"})
    if est > avail and not a.force:
        return emit({**base, "skipped": f"estimate {est / GB:.1f} GB > {avail / GB:.1f} GB available now "
                                        f"(FORCE=1 runs it anyway, the watchdog still guards)"})
    limit = min(budget, avail)
    os.makedirs(a.scratch, exist_ok=True)
    so, se = os.path.join(a.scratch, f"{a.row}.out"), os.path.join(a.scratch, f"{a.row}.err")
    targets = ",".join(TARGETS[cfg["model_type"]])
    if impl == "pytorch":
        cmd = [a.python, os.path.join(HERE, "scale_torch.py"), "--model", a.model, "--mode", mode,
               "--data", a.data, "--threads", str(a.threads), "--batch-size", str(a.batch),
               "--max-len", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--target-modules", targets]
        env = dict(os.environ)
    else:
        dtype, quant, embq, compute = mode
        out = os.path.join(a.scratch, f"{a.row}-run")
        cmd = [a.kaizen, "train", "--model", a.model, "--data", a.data, "--out", out, "--overwrite",
               "--max-len", str(a.seq), "--pack", "--batch-size", str(a.batch), "--r", "8",
               "--lora-alpha", "16", "--lora-dropout", "0", "--target-modules", targets,
               "--lr", "1e-4", "--lr-schedule", "constant", "--max-grad-norm", "1.0",
               "--max-steps", str(a.steps), "--no-shuffle", "--dtype", dtype]
        if quant:
            cmd += ["--quantize", quant]
        if embq:
            cmd += ["--quantize-embeddings", embq]
        if compute:
            cmd += ["--compute", compute]
        cmd += shlex.split(a.kaizen_extra)
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    print(f"scale_run: {label} {a.batch}x{a.seq}: estimate {est / GB:.1f} GB, watchdog at {limit / GB:.1f} GB ...",
          file=sys.stderr, flush=True)
    rc, maxrss, peak_anon, killed, wall = run_guarded(cmd, limit, env, so, se)
    base.update(peak_rss_gb=round(maxrss / GB, 3), peak_anon_gb=round(peak_anon / GB, 3),
                wall_seconds=round(wall, 1), command=" ".join(cmd))
    if killed:
        return emit({**base, "error": killed})
    if rc != 0:
        return emit({**base, "error": f"exit status {rc}: {error_summary(se)[:600]}"})
    if impl == "pytorch":
        return emit(parse_torch(base, so))
    return emit(parse_kaizen(base, a, out, se, mode))


def parse_torch(base, so):
    try:
        lines = [json.loads(l) for l in open(so) if l.strip().startswith("{")]
        r = lines[-1]
        assert r.get("impl") == "pytorch"
    except (OSError, ValueError, IndexError, AssertionError) as e:
        return {**base, "error": f"no summary line from scale_torch.py ({e}): {tail(so, 400)}"}
    load = next((l for l in lines if l.get("event") == "load"), {})
    return {**base, "s_step": r["s_step"], "tokens_per_sec": r["tokens_per_sec"], "losses": r["losses"],
            "step_seconds": r["step_seconds"], "load_seconds": r.get("load_seconds"),
            "load_peak_rss_gb": round(r["load_peak_rss_mb"] * 1024 * 1024 / GB, 3),
            "trainable_params": r["trainable_params"], "base_layer": load.get("base_layer") or r.get("base_layer"),
            "adapter_dtype": load.get("adapter_dtype"),
            "versions": f"torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']}"
                        + (f", bitsandbytes {r['bitsandbytes']}" if r.get("bitsandbytes") else ""),
            "attn_implementation": r.get("attn_implementation")}


def parse_kaizen(base, a, out, se, mode):
    dtype, quant, embq, compute = mode
    try:
        run = json.load(open(os.path.join(out, "run.json")))
        logs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    except (OSError, ValueError) as e:
        return {**base, "error": f"cannot read kaizen's run.json / metrics.jsonl: {e}"}
    if run.get("dtype", "f32") != dtype:
        return {**base, "error": f"asked for --dtype {dtype}, run.json records {run.get('dtype')!r}"}
    if quant and run.get("quantize") != quant:
        return {**base, "error": f"asked for --quantize {quant}, run.json records {run.get('quantize')!r}"}
    if compute and run.get("compute") != compute:
        return {**base, "error": f"asked for --compute {compute}, run.json records {run.get('compute')!r}"}
    if run.get("quantize_embeddings") != embq:
        return {**base, "error": f"asked for --quantize-embeddings {embq}, run.json records "
                                 f"{run.get('quantize_embeddings')!r}"}
    logs = [r for r in logs if "loss" in r]
    if len(logs) != a.steps:
        return {**base, "error": f"metrics.jsonl has {len(logs)} step lines, expected {a.steps}"}
    positions = a.batch * a.seq
    secs = [positions / r["tokens_per_sec"] for r in logs]
    s_step = statistics.median(secs[a.warmup:])
    err = tail(se, 20000)
    m = re.search(r"trainable params: (\d+)", err)
    warnings = [l for l in err.splitlines() if l.startswith("warning")]
    return {**base, "s_step": round(s_step, 4), "tokens_per_sec": round(positions / s_step, 3),
            "losses": [round(r["loss"], 6) for r in logs], "step_seconds": [round(s, 4) for s in secs],
            "trainable_params": int(m.group(1)) if m else None, "run_dtype": run.get("dtype"),
            "run_quantize": run.get("quantize"), "warnings": warnings[:5]}


def emit(obj):
    """The row's JSON line on stdout, a one-line summary on stderr."""
    print(json.dumps(obj), flush=True)
    if "s_step" in obj:
        s = (f"{obj['s_step']:.3f} s/step, first loss {obj['losses'][0]:.5f}, "
             f"peak RSS {obj['peak_rss_gb']:.2f} GB")
    elif "skipped" in obj:
        s = "skipped: " + obj["skipped"]
    else:
        s = "FAILED: " + " ".join(obj.get("error", "?").split())[:300]
    print(f"scale_run:   {obj['label']} {obj['batch_size']}x{obj['max_len']}: {s}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# table

def cmd_table(a):
    rows = [json.loads(l) for l in open(a.file) if l.strip()]
    configs = []
    for r in rows:
        c = (r["batch_size"], r["max_len"])
        if c not in configs:
            configs.append(c)
    ok = lambda r: r is not None and "s_step" in r
    print(f"Scale benchmark, shape {a.shape}: LoRA r=8 alpha=16 on the attention projections, AdamW; "
          f"{a.steps} steps ({a.warmup} untimed), {a.threads} threads; commit {a.commit}")
    for b, t in configs:
        group = [r for r in rows if (r["batch_size"], r["max_len"]) == (b, t)]
        by = {r["row"]: r for r in group}
        ref = by.get("torch-bf16")
        print()
        print(f"batch {b} x {t} tokens")
        print("| row | s/step | tokens/s | peak RSS GB | tokens/s vs PyTorch bf16 | RSS vs PyTorch bf16 "
              "| first-step loss (rel. diff vs reference row) |")
        print("|---|---|---|---|---|---|---|")
        for r in group:
            if not ok(r):
                why = r.get("skipped") or r.get("error") or "?"
                why = " ".join(why.split())[:300].replace("|", "/")
                rss = f"{r['peak_rss_gb']:.2f}" if r.get("peak_rss_gb") else "-"
                print(f"| {r['label']} | {'skipped' if 'skipped' in r else 'failed'}: {why} | - | {rss} | - | - | - |")
                continue
            tps = f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x" if ok(ref) else "n/a"
            rss = f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if ok(ref) else "n/a"
            loss = f"{r['losses'][0]:.5f}"
            lr = by.get(LOSS_REF[r["row"]]) if LOSS_REF[r["row"]] else None
            if ok(lr):
                rel = abs(r["losses"][0] - lr["losses"][0]) / abs(lr["losses"][0])
                loss += f" ({rel:.1e} vs {lr['label']})"
            print(f"| {r['label']} | {r['s_step']:.3f} | {r['tokens_per_sec']:.1f} | {r['peak_rss_gb']:.2f} | "
                  f"{tps} | {rss} | {loss} |")
    print()
    print("Details (est = the pre-run memory estimate; anon = the watchdog's peak sample of anonymous memory):")
    for r in rows:
        head = f"  {r['label']} {r['batch_size']}x{r['max_len']}: est {r.get('est_gb', '?')} GB"
        if r.get("peak_anon_gb") is not None:
            head += f", anon {r['peak_anon_gb']:.2f} GB, wall {r.get('wall_seconds')} s"
        if ok(r):
            head += (f"; losses {' '.join(f'{x:.4f}' for x in r['losses'])}; s/step "
                     f"{' '.join(f'{x:.2f}' for x in r['step_seconds'])}; trainable {r.get('trainable_params')}")
            if r["impl"] == "pytorch":
                head += (f"; load {r.get('load_seconds')} s, load peak {r.get('load_peak_rss_gb')} GB; "
                         f"base layer {r.get('base_layer')}, adapter {r.get('adapter_dtype')}")
            for w in r.get("warnings") or []:
                head += f"; kaizen {w}"
        elif "error" in r:
            head += f"; ERROR: {' '.join(r['error'].split())[:1500]}"
        else:
            head += f"; skipped: {r.get('skipped')}"
        print(head)
    vs = [r["versions"] for r in rows if r.get("versions")]
    v = max(vs, key=len) if vs else None  # the bnb row's also names bitsandbytes
    if v:
        print(f"pytorch side: {v}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("dst")
    d.add_argument("--tokens", type=int, required=True)
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("row")
    r.add_argument("--row", choices=list(ROWS), required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--seq", type=int, required=True)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--warmup", type=int, required=True)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--mem-gb", type=float, default=24)
    r.add_argument("--scratch", required=True)
    r.add_argument("--python", default=sys.executable)
    r.add_argument("--kaizen", default=os.environ.get("KAIZEN_BIN", "target/release/kaizen"))
    r.add_argument("--force", action="store_true")
    r.add_argument("--kaizen-extra", default="", help="more kaizen train flags for kaizen rows (shell words)")
    t = sub.add_parser("table")
    t.add_argument("file")
    t.add_argument("--shape", required=True)
    t.add_argument("--commit", required=True)
    t.add_argument("--threads", required=True)
    t.add_argument("--steps", required=True)
    t.add_argument("--warmup", required=True)
    a = ap.parse_args()
    if a.cmd == "row" and not 0 <= a.warmup < a.steps:
        ap.error("row: need 0 <= --warmup < --steps")
    {"data": cmd_data, "row": cmd_row, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
