#!/usr/bin/env bash
# Crash safety, measured (issue 14, item 3). Trains LoRA on a tiny committed fixture model with a
# checkpoint after every step, and checks two promises of `kaizen train`:
#
# 1. kill -9 at any moment, then `--resume` until done, gives the uninterrupted run's result byte
#    for byte. A reference run trains STEPS steps uninterrupted (twice: it must reproduce itself).
#    Each of TRIALS trials starts the same run in a fresh --out and kills it 1-3 times: after a
#    random delay spread over the run (timer kills), or the moment the N-th `.checkpoint-N.tmp`
#    appears (write kills, a third of them). After each kill the script resumes with `--resume`
#    (or starts over with --overwrite when no checkpoint was written yet), and at the end
#    compares the adapter files, every checkpoint and the step lines of metrics.jsonl with the
#    reference's, and looks for leftovers (`*.tmp`, `.NAME.PID.tmp.png`). A kill counts as "in a
#    checkpoint write" when the killed run left a `.checkpoint-N.tmp` behind.
# 2. A full disk: --out on a small tmpfs, sized so that the disk fills in the middle of each file
#    of checkpoint 3, 8, 13 and 18 in turn, ends the run with one `error:` line, no `.tmp` behind,
#    and the last checkpoint intact: its files equal the reference's checkpoint of that step,
#    `kaizen inspect --adapter` loads it, and once the disk is grown `--resume` finishes with the
#    reference's adapter. A fifth size fills the disk while loss.png is drawn after the last step:
#    exit 0 with a warning, the reference's adapter, no `.tmp.png`. Needs root (for mount);
#    without it this part is skipped with a message.
#
#   bash scripts/crash_safety.sh                     # defaults: about 3 minutes on 2 CPU cores
#   TRIALS=100 SEED=7 bash scripts/crash_safety.sh   # longer, another draw
#   KAIZEN_BIN=target/release/kaizen bash scripts/crash_safety.sh   # skip the build
#
# Environment: KAIZEN_BIN (default: cargo build --release --locked -p kaizen-cli, then
# ${CARGO_TARGET_DIR:-target}/release/kaizen), TRIALS (default 20), SEED (default 1), STEPS
# (default 30), DISK_FULL_RUNS (default and most 5; 0 skips the full-disk part), KEEP=1 keeps the work
# directory. Exits non-zero on any mismatch, leftover or failed check; prints a summary table.
set -euo pipefail
if [[ -n "${KAIZEN_BIN:-}" ]]; then KAIZEN_BIN="$(realpath "$KAIZEN_BIN")"; fi
cd "$(dirname "$0")/.."

TRIALS="${TRIALS:-20}"
SEED="${SEED:-1}"
STEPS="${STEPS:-30}"
DISK_FULL_RUNS="${DISK_FULL_RUNS:-5}"
MODEL="tests/fixtures/models/llama-gqa-tied"
if [[ -z "${KAIZEN_BIN:-}" ]]; then
  cargo build --release --locked -p kaizen-cli
  KAIZEN_BIN="${CARGO_TARGET_DIR:-target}/release/kaizen"
fi
KAIZEN_BIN="$(realpath "$KAIZEN_BIN")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kaizen-crash.XXXXXX")"
MNT="$WORK/disk"
cleanup() {
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" || echo "warning: could not unmount $MNT" >&2; fi
  if [[ -z "${KEEP:-}" ]]; then rm -rf "$WORK"; else echo "work directory kept: $WORK"; fi
}
trap cleanup EXIT

# The full-disk part needs a tmpfs; mount one now (resized per run by the checks below).
MOUNTED=0
if [[ "$DISK_FULL_RUNS" != 0 ]]; then
  mkdir -p "$MNT"
  if [[ "$(id -u)" != 0 ]]; then
    echo "note: not root, so no tmpfs can be mounted: the full-disk part is skipped"
  elif mount -t tmpfs -o size=64m tmpfs "$MNT" 2>"$WORK/mount.err"; then
    MOUNTED=1
  else
    echo "note: cannot mount a tmpfs here ($(tr '\n' ' ' <"$WORK/mount.err")): the full-disk" \
      "part is skipped"
  fi
fi

python3 - "$KAIZEN_BIN" "$MODEL" "$WORK" "$TRIALS" "$SEED" "$STEPS" "$DISK_FULL_RUNS" \
  "$MOUNTED" <<'PY'
import json, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path

BIN, MODEL, WORK = sys.argv[1], sys.argv[2], Path(sys.argv[3])
TRIALS, SEED, STEPS, DISK_RUNS = (int(a) for a in sys.argv[4:8])
MOUNTED = sys.argv[8] == "1"
DISK = WORK / "disk"
RUN_TIMEOUT = 600

# The data: completion rows as crates/kaizen-cli/tests/train.rs writes them (10 rows; 8 train
# in batches of 2, so 30 steps cross seven epochs and their reshuffles).
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "tiger", "piano"]
DATA = WORK / "train.jsonl"
DATA.write_text("".join(
    json.dumps({"prompt": f"Item {i}:",
                "completion": " " + " ".join(WORDS[(i + j) % 8] for j in range(1 + i % 4))}) + "\n"
    for i in range(10)))
OPTS = ["--val-split", "0.2", "--eval-every", "5", "--max-steps", str(STEPS), "--batch-size", "2",
        "--lr", "5e-3", "--seed", "7", "--save-every", "1"]


def cmd(out, *extra):
    return [BIN, "train", "--model", MODEL, "--data", str(DATA), "--out", str(out), *OPTS, *extra]


def run(out, *extra):
    """Runs train to the end; returns (exit code, stderr)."""
    p = subprocess.run(cmd(out, *extra), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT)
    return p.returncode, p.stderr


def is_leftover(name):
    """What only a write in progress has (kaizen's train::out_dir::is_leftover)."""
    return name.endswith(".tmp") or (name.startswith(".") and name.endswith(".tmp.png"))


def leftovers(out):
    found = []
    for root, dirs, files in os.walk(out):
        for n in dirs + files:
            if is_leftover(n):
                found.append(os.path.relpath(os.path.join(root, n), out))
    return sorted(found)


def checkpoints(out):
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*"))


def steps_of(out):
    """metrics.jsonl as {("step"|"eval", n): values that must reproduce}, and its problems
    (a step logged twice, a line that does not parse)."""
    lines, dups = {}, []
    path = Path(out) / "metrics.jsonl"
    for n, line in enumerate(path.read_text().splitlines() if path.is_file() else ["missing"]):
        try:
            v = json.loads(line)
            key = ("eval" if "eval_loss" in v else "step", v["step"])
        except (ValueError, KeyError, TypeError):
            dups.append(f"line {n + 1} unreadable: {line[:40]!r}")
            continue
        if key in lines:
            dups.append(key)
        lines[key] = {k: v.get(k) for k in ("loss", "lr", "grad_norm", "eval_loss")}
    return lines, dups


def same_metrics(a, b):
    """Equal, but for the last bits of a logged loss: the summed NLL is a rayon parallel sum
    (nn/loss.rs), whose order varies from run to run, uninterrupted runs included."""
    if a is None or b is None:
        return a == b
    return all(a[k] == b[k] or (isinstance(a[k], float) and isinstance(b[k], float)
                                and abs(a[k] - b[k]) <= 1e-12 * abs(b[k])) for k in b)


def differences(out, ref):
    """Every way `out` differs from the reference run directory `ref` (empty: identical)."""
    out, ref, diffs = Path(out), Path(ref), []
    for f in sorted(ref.iterdir()):
        if f.suffix == ".safetensors" or f.name == "adapter_config.json":
            if not (out / f.name).is_file():
                diffs.append(f"{f.name} missing")
            elif (out / f.name).read_bytes() != f.read_bytes():
                diffs.append(f"{f.name} differs")
    if checkpoints(out) != checkpoints(ref):
        diffs.append(f"checkpoints {checkpoints(out)} vs {checkpoints(ref)}")
    for n in checkpoints(ref):
        a, b = out / f"checkpoint-{n}", ref / f"checkpoint-{n}"
        for f in sorted(b.iterdir()):
            if a.is_dir() and (not (a / f.name).is_file() or (a / f.name).read_bytes() != f.read_bytes()):
                diffs.append(f"checkpoint-{n}/{f.name} differs")
    got, dups = steps_of(out)
    want, _ = steps_of(ref)
    if dups:
        diffs.append(f"metrics.jsonl: {dups[:5]}")
    bad = sorted(k for k in set(got) | set(want) if not same_metrics(got.get(k), want.get(k)))
    if bad:
        diffs.append(f"metrics.jsonl differs at {bad[:5]}")
    if not (out / "loss.png").is_file():
        diffs.append("loss.png missing")
    return diffs


def kill_run(p, out, rng, duration, mode):
    """Waits as `mode` says, then SIGKILLs p; returns True if p was killed (False: it finished)."""
    if mode == "timer":
        try:
            p.wait(timeout=rng.uniform(0.0, duration))
            return False
        except subprocess.TimeoutExpired:
            pass
    else:
        # Kill as the N-th checkpoint's temporary directory appears, N spread over the run.
        want, seen = rng.randint(1, STEPS - 1), set()
        while p.poll() is None and len(seen) < want:
            try:
                seen.update(e.name for e in os.scandir(out)
                            if e.name.startswith(".checkpoint-") and e.name.endswith(".tmp"))
            except FileNotFoundError:
                pass
        if p.poll() is not None:
            return False
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the group: KAIZEN_BIN may be a wrapper script
    p.wait()
    return p.returncode == -signal.SIGKILL


def trial(i, rng, ref, duration, tally):
    out = WORK / f"trial-{i}"
    planned = rng.choice([1, 1, 2, 3])
    notes, errors = [], []
    for k in range(planned + 1):
        resume = bool(checkpoints(out)) if out.exists() else False
        extra = ["--resume"] if resume else (["--overwrite"] if k else [])
        if k == planned:
            code, err = run(out, *extra)
            if code != 0:
                errors.append(f"final run exit {code}: {err.strip().splitlines()[-1:]}")
            break
        mode = "write" if rng.random() < 1 / 3 else "timer"
        p = subprocess.Popen(cmd(out, *extra), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        if not kill_run(p, out, rng, duration, mode):
            if p.returncode != 0:
                errors.append(f"run exit {p.returncode} before its kill")
            notes.append(f"{mode}:finished")
            break
        left = leftovers(out)
        in_ckpt = any(n.startswith(".checkpoint-") for n in left)
        tally["kills"] += 1
        tally["in_ckpt_write"] += in_ckpt
        tally["in_other_write"] += bool(left) and not in_ckpt
        tally["restarts"] += not bool(checkpoints(out))
        at = f"ckpt {checkpoints(out)[-1]}" if checkpoints(out) else "no ckpt"
        notes.append(f"{mode}:{at}" + (f" [{', '.join(left)}]" if left else ""))
    left = leftovers(out)
    diffs = errors or differences(out, ref)
    tally["identical"] += not diffs
    tally["leftover_trials"] += bool(left)
    status = "ok" if not diffs and not left else "FAIL"
    print(f"  trial {i:2}: {status}  {'; '.join(notes)}"
          + (f"  DIFF: {'; '.join(diffs)}" if diffs else "")
          + (f"  LEFTOVER: {left}" if left else ""), flush=True)
    if status == "ok":
        shutil.rmtree(out)
    return status == "ok"


def crash_trials():
    ref, again = WORK / "reference", WORK / "reference-again"
    t0 = time.monotonic()
    code, err = run(ref)
    duration = time.monotonic() - t0
    if code != 0:
        sys.exit(f"reference run failed ({code}): {err}")
    code, err = run(again)
    same = code == 0 and not differences(again, ref)
    print(f"reference: {STEPS} steps, checkpoint every step, {duration:.1f} s; "
          f"a second uninterrupted run {'is identical' if same else 'DIFFERS'}", flush=True)
    if not same:
        sys.exit("the uninterrupted run does not reproduce itself; resume cannot be judged")
    rng = random.Random(SEED)
    tally = dict(kills=0, in_ckpt_write=0, in_other_write=0, restarts=0, identical=0,
                 leftover_trials=0)
    ok = all([trial(i, rng, ref, duration * 1.1, tally) for i in range(1, TRIALS + 1)])
    return ok, tally, ref


def pages(paths):
    """Bytes that tmpfs charges for these files: whole 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in paths if p.is_file())


# The order a checkpoint's files are written in (trainer.rs save_checkpoint, Method::save).
CKPT_ORDER = ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
              "trainer_state.json"]


def disk_sizes(ref):
    """tmpfs sizes at which the disk fills in the middle of each file of checkpoint K+1 (K = 2
    up to STEPS/2), and one at which it fills while loss.png is drawn, after the last step."""
    ck = ref / "checkpoint-1"
    sizes = []
    for j, name in enumerate(CKPT_ORDER[:max(DISK_RUNS - 1, 1)]):
        fits = 2 + (STEPS // 2) * j // max(len(CKPT_ORDER) - 1, 1)
        lines = [l for l in (ref / "metrics.jsonl").read_text().splitlines()
                 if json.loads(l)["step"] <= fits + 1]
        metrics = -(-(sum(len(l) + 1 for l in lines)) // 4096) * 4096
        before = pages(ck / n for n in CKPT_ORDER[:CKPT_ORDER.index(name)])
        middle = pages([ck / name]) // 8192 * 4096
        sizes.append(pages([ref / "run.json"]) + metrics + fits * pages(ck.iterdir())
                     + before + middle)
    if DISK_RUNS > 1:
        drawn = [f for f in ref.rglob("*") if f.name != "loss.png"]
        sizes.append(pages(drawn) + pages([ref / "loss.png"]) // 8192 * 4096)
    return sizes


def disk_full(ref, size):
    """One run with --out on a tmpfs of `size` bytes; returns (ok, summary lines)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(DISK)], check=True)
    out = DISK / "run"
    code, err = run(out)
    lines = err.strip().splitlines() or [""]
    last_line = lines[-1]
    saved = checkpoints(out)
    left = leftovers(out)
    problems = [f"leftovers {left}"] if left else []
    if code == 0:
        # The disk filled after the adapter was written: only loss.png may be missing.
        if not any(l.startswith("warning: could not draw loss.png") for l in lines):
            problems.append("exit 0 on a full disk without a warning about loss.png")
        problems += [d for d in differences(out, ref) if d != "loss.png missing"]
        last_line = next((l for l in lines if l.startswith("warning:")), last_line)
    elif not last_line.startswith("error:") or "No space left" not in last_line:
        problems.append(f"last stderr line is not one clear error: {last_line!r}")
    elif not saved:
        problems.append("no checkpoint fitted (tmpfs too small?)")
    else:
        last = f"checkpoint-{saved[-1]}"
        for f in sorted((ref / last).iterdir()):
            if not (out / last / f.name).is_file() or (out / last / f.name).read_bytes() != f.read_bytes():
                problems.append(f"{last}/{f.name} differs from the reference's")
        insp = subprocess.run([BIN, "inspect", "--model", MODEL, "--adapter", str(out / last)],
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if insp.returncode != 0:
            problems.append(f"kaizen inspect --adapter {last} failed: {insp.stderr.strip()}")
        # Grow the disk: the run resumes from that checkpoint and ends as the reference did.
        subprocess.run(["mount", "-o", "remount,size=64m", str(DISK)], check=True)
        rcode, rerr = run(out, "--resume")
        if rcode != 0:
            problems.append(f"--resume after the full disk failed: {rerr.strip()}")
        else:
            problems += [f"after resume: {d}" for d in differences(out, ref)]
            if leftovers(out):
                problems.append(f"leftovers after resume {leftovers(out)}")
    shutil.rmtree(out)
    where = f"checkpoint-{saved[-1]}" if saved else "none"
    line = (f"  tmpfs {size // 1024:4} KiB: exit {code}, last checkpoint {where}, "
            f"leftovers {len(left)}{', resumed: identical' if code and not problems else ''}\n"
            f"    {last_line.replace(str(out), 'OUT')}")
    for p in problems:
        line += f"\n    FAIL: {p}"
    return not problems, line


ok, tally, ref = crash_trials()
disk_ok, disk_lines = True, []
if DISK_RUNS and MOUNTED:
    print("full disk (tmpfs as --out):", flush=True)
    for size in disk_sizes(ref):
        good, line = disk_full(ref, size)
        disk_ok &= good
        disk_lines.append(line)
        print(line, flush=True)

print()
print("| crash safety                          |      |")
print("|---------------------------------------|------|")
print(f"| trials (kill -9, then --resume)       | {TRIALS:4} |")
print(f"| kills                                 | {tally['kills']:4} |")
print(f"|   of which in a checkpoint write      | {tally['in_ckpt_write']:4} |")
print(f"|   of which in another atomic write    | {tally['in_other_write']:4} |")
print(f"|   before the first checkpoint         | {tally['restarts']:4} |")
print(f"| results identical to uninterrupted    | {tally['identical']:4} |")
print(f"| trials with leftovers (.tmp)          | {tally['leftover_trials']:4} |")
if DISK_RUNS and MOUNTED:
    passed = sum(1 for line in disk_lines if "FAIL" not in line)
    print(f"| full-disk runs (tmpfs)                | {len(disk_lines):4} |")
    print(f"|   of which passed                     | {passed:4} |")
elif DISK_RUNS:
    print("| full-disk runs                        | skipped (no tmpfs mount) |")
sys.exit(0 if ok and disk_ok else 1)
PY
