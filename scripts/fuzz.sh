#!/usr/bin/env bash
# Fuzzes kaizen's parsers of untrusted input (crates/kaizen-fuzz; RELIABILITY.md, "Fuzzing").
#
#   bash scripts/fuzz.sh                       # every target, 60 s each
#   FUZZ_SECONDS=300 FUZZ_TARGETS="gguf jsonl" bash scripts/fuzz.sh
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_TARGETS    space-separated target names (default: all; `--list` prints them)
#   FUZZ_ENGINE     libfuzzer | stable | auto (default auto: libFuzzer through `cargo +nightly
#                   fuzz` when nightly and cargo-fuzz are installed, else the stable harness)
#   FUZZ_SEED       the stable harness's RNG seed (default 1; libFuzzer gets it as -seed)
#   FUZZ_PROFILE    cargo profile of the stable harness (default release)
#   FUZZ_SANITIZER  cargo fuzz's -s (default address; `none` builds faster, but then only
#                   the RSS limit, not the 1 GiB allocation limit, is enforced)
#
# The corpus is kept in fuzz/corpus/<target>/ (gitignored), started from the committed seeds in
# fuzz/seeds/<target>/; findings go to fuzz/findings/. A case over 10 s, a panic, an allocation
# past 1 GiB or an error message with raw control characters is a finding. Prints a table
# (target, cases, findings) and exits 1 if anything was found.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${FUZZ_SECONDS:-60}
SEED=${FUZZ_SEED:-1}
PROFILE=${FUZZ_PROFILE:-release}
SANITIZER=${FUZZ_SANITIZER:-address}
ALL="safetensors gguf config_json adapter_config adapter_safetensors tokenizer_json tokenizer_config spiece jsonl chat_template"
if [[ "${1:-}" == "--list" ]]; then
  tr ' ' '\n' <<<"$ALL"
  exit 0
fi
TARGETS=${FUZZ_TARGETS:-$ALL}
for t in $TARGETS; do
  [[ " $ALL " == *" $t "* ]] || { echo "error: unknown target '$t'; targets: $ALL" >&2; exit 2; }
done

ENGINE=${FUZZ_ENGINE:-auto}
if [[ "$ENGINE" == auto ]]; then
  if rustup toolchain list 2>/dev/null | grep -q '^nightly' && cargo fuzz --version >/dev/null 2>&1; then
    ENGINE=libfuzzer
  else
    ENGINE=stable
  fi
fi
mkdir -p fuzz/corpus fuzz/findings
echo "engine: $ENGINE, $SECS s per target, seed $SEED"

found=0
rows=()
if [[ "$ENGINE" == libfuzzer ]]; then
  cd fuzz
  cargo +nightly fuzz build -s "$SANITIZER"
  for t in $TARGETS; do
    mkdir -p "corpus/$t"
    log="findings/$t.log"
    set +e
    cargo +nightly fuzz run -s "$SANITIZER" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -max_len=9437184 -seed="$SEED" -print_final_stats=1 -artifact_prefix="findings/$t-" \
      >"$log" 2>&1
    rc=$?
    set -e
    cases=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    crashes=0
    if [[ $rc -ne 0 ]]; then
      crashes=1
      found=1
      echo "FINDING in $t (exit $rc); log: fuzz/$log" >&2
      grep -E 'FINDING|panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 >&2 || true
    fi
    rows+=("| $t | ${cases:-?} | $(ls "corpus/$t" | wc -l) | $crashes |")
  done
  cd ..
  echo
  echo "| target | cases | corpus | findings |"
  echo "|---|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
else
  cargo build --profile "$PROFILE" -p kaizen-fuzz --bin kaizen-fuzz
  dir=$PROFILE
  [[ "$PROFILE" == dev ]] && dir=debug
  bin="${CARGO_TARGET_DIR:-target}/$dir/kaizen-fuzz"
  set +e
  # One process per target, so a watchdog or allocation abort ends only that target's run.
  echo
  for t in $TARGETS; do
    "$bin" --seconds "$SECS" --seed "$SEED" --corpus fuzz/corpus --findings fuzz/findings "$t" \
      >"fuzz/findings/$t.out"
    rc=$?
    if [[ $rc -ne 0 ]]; then
      found=1
      # A process that died mid-case left its input as current-*: keep it as a finding.
      for c in fuzz/findings/current-"$t"-*; do
        [[ -e "$c" ]] && mv "$c" "fuzz/findings/abort-$t-$(date +%s)-$RANDOM"
      done
      echo "FINDING in $t (exit $rc); see fuzz/findings/" >&2
    fi
    [[ -s "fuzz/findings/$t.out" ]] || echo "| $t | (aborted) | | | | | | | 1 |" >"fuzz/findings/$t.out"
  done
  set -e
  echo "| target | cases | accepted | refused | guarded panics | corpus | slowest case | peak memory | findings |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in $TARGETS; do grep "^| $t " "fuzz/findings/$t.out"; done
fi
if [[ $found -ne 0 ]]; then
  echo "fuzzing found problems: see fuzz/findings/" >&2
  exit 1
fi
