#!/usr/bin/env bash
# Decoding speed, kaizen vs llama.cpp, on the same quantized GGUF (SmolLM2-135M-Instruct Q4_1):
# batch 1, greedy, a short prompt (no chat template), a fixed number of new tokens (EOS ignored),
# the same thread count. Prints one markdown table and the commits measured. Issue 12's target:
# kaizen kept quantized with --compute int8 >= 0.80x llama.cpp's decoding tokens/s.
#   LLAMA_CPP_BIN_DIR=/path/to/llama.cpp/build/bin bash scripts/bench/decode.sh [NEW_TOKENS] [THREADS]
#                                                      (default 128 new tokens, 2 threads)
# Takes about 1.5-2 minutes at the defaults on a quiet 2-core machine (6 llama.cpp processes of
# ~1-3 s, 24 kaizen processes of ~1-4 s, plus the release build if it is stale), longer when it
# waits for the machine to quieten (below).
# Needs: a llama.cpp build with llama-bench and llama-completion in LLAMA_CPP_BIN_DIR
# (shared/ASSETS.md, "llama.cpp itself": cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
# && cmake --build build -j2 --target llama-bench llama-completion). On a CPU whose cpuinfo lists
# AMX but whose kernel/sandbox does not grant AMX state, a GGML_NATIVE build dies with SIGILL in
# ggml's AMX kernels (tilezero); configure with -DGGML_NATIVE=OFF and the AVX/AVX2/FMA/F16C/
# AVX512*/AVX_VNNI options ON and GGML_AMX_* OFF instead.
#
# Rows, run one after another, each alone (nothing else of ours runs meanwhile):
#   llama.cpp bench       llama-bench -m GGUF -p 0 -n N -t THREADS -r 1 (its "tg" test: N tokens
#                         decoded after an empty prompt, warm-up run first; decode only)
#   llama.cpp completion  llama-completion -p PROMPT -n N --temp 0 --ignore-eos -no-cnv; its own
#                         "eval time" line (decode steps only, after the prompt's prefill)
#   kaizen int8           kaizen generate --quantize q8_0 --compute int8 (the GGUF's Q4_1/Q8_0
#                         tensors kept as they are; activations quantized to 8 bits per block,
#                         integer dot products, as llama.cpp does)
#   kaizen q exact        kaizen generate --quantize q8_0 (kept quantized; each weight row
#                         dequantized for the product, bf16 compute: kaizen's default there)
#   kaizen bf16 / f32     kaizen generate --dtype bf16 / f32 (dequantized once at load)
# Each row: best of 3 fresh processes. llama.cpp reports decode-only speed. kaizen's --json
# `seconds` covers prefill + decoding (load excluded), so each kaizen row runs N new tokens and 1
# new token (= prefill of the prompt + one pick), best of 3 each, and its decode tokens/s is
# (N - 1) / (t_N - t_1); the "prefill+decode" column is kaizen's own tokens_per_sec of the N run.
# The ratio column divides each row's decode tokens/s by llama-bench's.
#
# Quiet machine: right before each row the 1-minute load average (/proc/loadavg) must be below
# LOAD_MAX (default 1.3; our own previous row counts in it too), and right before each process
# the CPUs must be less than BUSY_MAX (default 0.15) busy over a 2 s sample of /proc/stat (the
# load average lags: one other process on one of 2 cores makes llama.cpp's spinning OpenMP
# threads 10x slower). Otherwise it waits and checks again, at most WAIT_MAX seconds (default
# 1200) over the whole run, then runs anyway and marks the row "busy". The table shows the load
# average each row started under and the busiest pre-run sample.
# KAIZEN_BIN overrides the kaizen binary (default ${CARGO_TARGET_DIR:-target}/release/kaizen,
# built here). Scratch output stays in a temporary directory, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-128}"
THREADS="${2:-2}"
CACHE="${KAIZEN_CACHE:-cache}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT="Write a short story about a robot who learns to paint."

die() { echo "bench/decode: error: $*" >&2; exit 1; }
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 2 ]] || die "NEW_TOKENS must be an integer >= 2 (got '$N')"
[[ "$THREADS" =~ ^[0-9]+$ && "$THREADS" -ge 1 ]] || die "THREADS must be a positive integer (got '$THREADS')"
command -v python3 >/dev/null || die "python3 not found (drives the runs and prints the table)"
[[ -n "${LLAMA_CPP_BIN_DIR:-}" ]] \
    || die "set LLAMA_CPP_BIN_DIR to a llama.cpp build's bin directory holding llama-bench and llama-completion (see the header of $0)"
for b in llama-bench llama-completion; do
    [[ -x "$LLAMA_CPP_BIN_DIR/$b" ]] || die "no executable $LLAMA_CPP_BIN_DIR/$b (LLAMA_CPP_BIN_DIR=$LLAMA_CPP_BIN_DIR; build it: cmake --build build --target $b)"
done

bash scripts/fetch_assets.sh "$CACHE" >/dev/null || die "fetching the assets failed (see above)"
if [[ -z "${KAIZEN_BIN:-}" ]]; then
    cargo build --release --locked -p kaizen-cli || die "cargo build failed"
    KAIZEN_BIN="${CARGO_TARGET_DIR:-target}/release/kaizen"
fi
[[ "$("$KAIZEN_BIN" generate --help)" == *--compute* ]] \
    || die "$KAIZEN_BIN generate has no --compute flag (an older build?)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- crates 2>/dev/null || COMMIT="$COMMIT (crates/ modified in the work tree)"

python3 - "$KAIZEN_BIN" "$LLAMA_CPP_BIN_DIR" "$GGUF" "$PROMPT" "$N" "$THREADS" "$TMP" "$COMMIT" <<'PY'
import json, os, re, subprocess, sys, time

kaizen, llbin, gguf, prompt, n, threads, tmp, commit = sys.argv[1:]
n, threads = int(n), int(threads)
RUNS = 3
LOAD_MAX = float(os.environ.get("LOAD_MAX", "1.3"))
BUSY_MAX = float(os.environ.get("BUSY_MAX", "0.15"))
wait_left = float(os.environ.get("WAIT_MAX", "1200"))
waited_total = 0.0


def die(msg):
    sys.exit(f"bench/decode: error: {msg}")


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_busy(secs=2.0):
    """Fraction of all CPUs' time not idle over the next `secs` seconds (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(secs)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(name, row_start):
    """Waits until the CPUs are idle now (and, at a row's start, the 1-minute load is below
    LOAD_MAX) or the wait budget is spent. Returns (load, busy now, ran busy)."""
    global wait_left, waited_total
    while True:
        l, b = load1(), cpu_busy()
        if b < BUSY_MAX and (not row_start or l < LOAD_MAX):
            return l, b, False
        if wait_left <= 0:
            print(f"bench/decode: load {l:.2f}, CPUs {b:.0%} busy before '{name}', wait budget spent: running anyway",
                  file=sys.stderr)
            return l, b, True
        print(f"bench/decode: load {l:.2f}, CPUs {b:.0%} busy before '{name}': waiting", file=sys.stderr)
        time.sleep(10)
        wait_left -= 12
        waited_total += 12


ROW = {}  # the current row's name and whether any of its processes ran on a busy machine


def quiet():
    """Before each process of a row: wait until the CPUs are idle (see wait_quiet)."""
    _, b, busy = wait_quiet(ROW["name"], False)
    ROW["busy"] = ROW["busy"] or busy
    ROW["max_busy"] = max(ROW["max_busy"], b)


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        die(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p


def llama_bench():
    cmd = [f"{llbin}/llama-bench", "-m", gguf, "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1", "-o", "json"]
    runs, info = [], None
    for _ in range(RUNS):
        quiet()
        r = json.loads(run(cmd).stdout)
        tg = [t for t in r if t.get("n_gen") == n and t.get("n_prompt") == 0]
        if len(tg) != 1:
            die(f"llama-bench printed no tg{n} result: {r}")
        runs.append(tg[0]["avg_ts"])
        info = tg[0]
    return {"decode_tps": max(runs), "runs": runs, "info": info}


def llama_completion():
    cmd = [f"{llbin}/llama-completion", "-m", gguf, "-p", prompt, "-n", str(n), "--temp", "0", "--ignore-eos",
           "-no-cnv", "--no-display-prompt", "-t", str(threads), "--seed", "0"]
    best, runs = None, []
    for _ in range(RUNS):
        quiet()
        p = run(cmd)
        ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", p.stderr)
        pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", p.stderr)
        if not ev or not pe:
            die(f"llama-completion printed no perf lines:\n{p.stderr[-2000:]}")
        steps = int(ev.group(2))
        tps = steps / (float(ev.group(1)) / 1000)
        runs.append(tps)
        if best is None or tps > best["decode_tps"]:
            best = {"decode_tps": tps, "steps": steps, "prompt_tokens": int(pe.group(2)), "text": p.stdout}
    best["runs"] = runs
    return best


def kaizen_gen(extra, new):
    cmd = [kaizen, "generate", "--model", gguf, "--prompt", prompt, "--greedy", "--max-new-tokens", str(new),
           "--min-new-tokens", str(new), "--json"] + extra
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = []
    for _ in range(RUNS):
        quiet()
        p = run(cmd, env)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if len(r["ids"]) != new:
            die(f"{' '.join(cmd)} produced {len(r['ids'])} tokens, expected {new}")
        out.append(r)
    return min(out, key=lambda r: r["seconds"]), [r["seconds"] for r in out]


def kaizen_row(extra):
    full, secs_n = kaizen_gen(extra, n)
    one, secs_1 = kaizen_gen(extra, 1)
    dt = full["seconds"] - one["seconds"]
    return {"decode_tps": (n - 1) / dt if dt > 0 else float("nan"), "pd_tps": full["tokens_per_sec"],
            "prompt_tokens": full["prompt_tokens"], "text": full["text"], "runs_n": secs_n, "runs_1": secs_1,
            "prefill_s": one["seconds"]}


ROWS = [
    ("llama.cpp", "llama-bench tg (Q4_1/Q8_0 as stored)", llama_bench),
    ("llama.cpp", "llama-completion eval (Q4_1/Q8_0 as stored, --temp 0)", llama_completion),
    ("kaizen", "--quantize q8_0 --compute int8 (kept quantized, int8 dots)",
     lambda: kaizen_row(["--quantize", "q8_0", "--compute", "int8"])),
    ("kaizen", "--quantize q8_0 (kept quantized, rows dequantized, bf16)", lambda: kaizen_row(["--quantize", "q8_0"])),
    ("kaizen", "--dtype bf16 (dequantized at load)", lambda: kaizen_row(["--dtype", "bf16"])),
    ("kaizen", "--dtype f32 (dequantized at load)", lambda: kaizen_row(["--dtype", "f32"])),
]
results = []
for impl, what, fn in ROWS:
    name = f"{impl} {what}"
    l, b, busy = wait_quiet(name, True)
    ROW.update(name=name, busy=busy, max_busy=b)
    t0 = time.time()
    r = fn()
    r.update(impl=impl, what=what, load=l, busy=ROW["busy"], max_busy=ROW["max_busy"], wall=time.time() - t0)
    results.append(r)
    print(f"bench/decode: {impl} {what}: {r['decode_tps']:.1f} tokens/s (load {l:.2f})", file=sys.stderr)

ref = results[0]["decode_tps"]
info = results[0]["info"]
print(f"SmolLM2-135M-Instruct Q4_1 GGUF, decoding: batch 1, greedy, {n} new tokens, {threads} threads; "
      f"kaizen {commit}; llama.cpp {llbin} (build {info.get('build_number')}, commit {info.get('build_commit')}, "
      f"backend {info.get('backends')}); CPU {info.get('cpu_info')}")
print("| impl | run | prompt tokens | decode tokens/s | vs llama-bench | prefill+decode tokens/s | 1-min load at start | CPUs busy before a run (max) |")
print("|---|---|---|---|---|---|---|---|")
for r in results:
    pt = r.get("prompt_tokens", 0 if r["what"].startswith("llama-bench") else "-")
    pd = f"{r['pd_tps']:.1f}" if "pd_tps" in r else "-"
    print(f"| {r['impl']} | {r['what']} | {pt} | {r['decode_tps']:.1f} | {r['decode_tps'] / ref:.2f}x | {pd} | "
          f"{r['load']:.2f} | {r['max_busy']:.0%}{' (busy: wait budget spent)' if r['busy'] else ''} |")
k = next(r for r in results if "int8" in r["what"])
ratio = k["decode_tps"] / ref
print(f"target: kaizen int8 / llama.cpp >= 0.80: {ratio:.2f}x {'ok' if ratio >= 0.8 else 'MISS'}")
lc = results[1]["text"].rstrip("\n")  # llama-completion ends its output with newlines of its own
for r in results[2:]:
    kt = r["text"].rstrip("\n")
    i = next((j for j, (a, b) in enumerate(zip(lc, kt)) if a != b), min(len(lc), len(kt)))
    same = "identical" if lc == kt else f"first {i} of {len(lc)} characters equal"
    print(f"greedy text vs llama-completion: kaizen {r['what'].split(' (')[0]}: {same}")
print("runs (tokens/s or seconds): " + "; ".join(
    f"{r['impl']} {r['what'].split(' (')[0]}: " + (
        " ".join(f"{x:.1f}" for x in r["runs"]) + " tokens/s" if "runs" in r else
        "N " + " ".join(f"{x:.2f}" for x in r["runs_n"]) + " s, 1 " + " ".join(f"{x:.3f}" for x in r["runs_1"]) + " s")
    for r in results))
if waited_total:
    print(f"waited {waited_total:.0f} s in all for a quiet machine (1-min load < {LOAD_MAX} at each row's start, "
          f"CPUs < {BUSY_MAX:.0%} busy over 2 s before each process)")
PY
