#!/usr/bin/env python3
"""Japanese instruction data from Debian's manpages-ja package (standard library only).

From each installed page's NAME section (`.SH 名前` / `.SH 名称` / `.SH NAME`, or mdoc's `.Sh`
with `.Nm` / `.Nd`) it makes one pair (an alias symlink such as telinit -> init is a page too):

    {"instruction": "ls (1) は何をするものですか？", "output": "ディレクトリの内容をリスト表示する"}

Pairs are deduplicated by (name, section) and split 90/10 into train.jsonl / val.jsonl by a hash
of the name, so the split never depends on file order. prose.jsonl holds {"text"} paragraphs of
Japanese body prose from the description sections (man(7) pages only), capped at --prose-kb.

    python3 scripts/data/manpages_ja.py --cache cache --out runs/data/manpages_ja

The .deb is looked for in --cache (fetched there with `apt-get download manpages-ja` when
missing) or given with --deb; it is extracted with `dpkg-deb -x` into CACHE/manpages-ja.
"""

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

NAME_HEADINGS = {"名前", "名称", "NAME"}
PROSE_HEADINGS = {"説明", "解説", "DESCRIPTION"}
VAL_PERCENT = 10

# roff escapes that stand for a character; the rest of the escapes are dropped.
ESCAPES = {
    r"\-": "-", r"\(em": "—", r"\(en": "–", r"\(aq": "'", r"\(dq": '"', r"\(lq": "“",
    r"\(rq": "”", r"\(oq": "‘", r"\(cq": "’", r"\(bu": "•", r"\(co": "©", r"\(mu": "×",
    r"\(>=": "≥", r"\(<=": "≤", r"\*(lq": "“", r"\*(rq": "”", r"\*(Tm": "™", r"\e": "\\",
    r"\ ": " ", r"\~": " ", r"\0": " ",
}
DROP = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[-+]?\d+|\\[&,/|^c%:)]|\\\*(\(..|\[[^\]]*\]|.)")
# man(7) font macros: their arguments are text (the alternating ones are joined without spaces).
FONT_MACROS = {".B", ".I", ".SM", ".SB"}
ALT_MACROS = {".BR", ".RB", ".IR", ".RI", ".BI", ".IB"}
# Requests that end a filled line (besides `.br` and a blank line).
BREAKS = {".PP", ".LP", ".P", ".TP", ".IP", ".HP", ".SH", ".SS", ".sp", ".RS", ".RE", ".nf", ".TS"}


def find_deb(cache: Path) -> Path:
    debs = sorted(cache.glob("manpages-ja_*.deb"))
    if not debs:
        print(f"no manpages-ja .deb in {cache}; running apt-get download manpages-ja", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["apt-get", "download", "manpages-ja"], cwd=cache).returncode != 0:
            # A fresh machine may have no package lists yet.
            print("apt-get download failed; running apt-get update and trying again", file=sys.stderr)
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(["apt-get", "download", "manpages-ja"], cwd=cache, check=True)
        debs = sorted(cache.glob("manpages-ja_*.deb"))
    if not debs:
        sys.exit(f"apt-get download left no manpages-ja_*.deb in {cache}")
    return debs[-1]


def extract(deb: Path, dest: Path) -> Path:
    man = dest / "usr/share/man/ja"
    if not man.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return man


def unescape(text: str) -> str:
    text = re.sub(r'\\".*', "", text)  # comment
    for esc, char in ESCAPES.items():
        text = text.replace(esc, char)
    return DROP.sub("", text).replace("\\", "")


def macro_args(line: str) -> list:
    """A request line's arguments, double-quoted ones kept whole."""
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', line)[1:]]


def text_of(line: str):
    """The text a roff line contributes, or None for a request that prints nothing."""
    if line.startswith((".", "'")):
        macro = line.split(maxsplit=1)[0]
        if macro in FONT_MACROS:
            return unescape(" ".join(macro_args(line)))
        if macro in ALT_MACROS:
            return unescape("".join(macro_args(line)))
        return None
    return unescape(line)


def sections(lines: list) -> dict:
    """Heading -> its lines, for `.SH` (man) and `.Sh` (mdoc) headings; the first one wins."""
    out, current = {}, None
    for line in lines:
        if line.startswith((".SH", ".Sh")):
            args = macro_args(line)
            current = " ".join(args) if args else None
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line)
    return out


def join_text(parts: list) -> str:
    """Joins text lines: no space between two Japanese characters, one elsewhere."""
    out = ""
    for p in (p.strip() for p in parts):
        if not p:
            continue
        if out and not (is_japanese(out[-1]) and is_japanese(p[0])):
            out += " "
        out += p
    return re.sub(r"\s+", " ", out).strip()


def is_japanese(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"


def name_entries(body: list) -> list:
    """[(names, description)] from a NAME section, man or mdoc. A man(7) NAME section may hold
    several `names \\- description` lines separated by `.br` (hostname(1) does)."""
    if any(l.startswith(".Nm") for l in body):  # mdoc: .Nm name ... [.Nd] description
        names = [a.rstrip(",") for l in body if l.startswith(".Nm") for a in macro_args(l)]
        desc = [" ".join(macro_args(l)) if l.startswith(".") else l for l in body if not l.startswith(".Nm")]
        return [(names, join_text(unescape(l) for l in desc))]
    entries = []
    for text in output_lines(body):
        m = re.match(r"(.+?)\s+[-–—]+(\s+(.*))?$", text)
        if m:
            entries.append((re.split(r"\s*,\s*", m.group(1)), m.group(3) or ""))
        elif entries:
            entries[-1] = (entries[-1][0], join_text([entries[-1][1], text]))
    return entries


def output_lines(body: list) -> list:
    """The lines roff prints: text lines are filled together until a break (`.br`, `.PP`, ...)."""
    lines, current = [], []
    for line in body + [".br"]:
        macro = line.split(maxsplit=1)[0] if line.strip() else ""
        if macro in BREAKS or macro in {"", ".br"}:
            if current:
                lines.append(join_text(current))
            current = []
        elif (text := text_of(line)):
            current.append(text)
    return lines


def description(page_name: str, body: list):
    """The description of `page_name` in a NAME section: its own entry, else the first one."""
    entries = [(n, d) for n, d in name_entries(body) if d]
    own = [d for names, d in entries if page_name in (n.strip() for n in names)]
    return (own or [d for _, d in entries] or [None])[0]


def prose_paragraphs(body: list) -> list:
    """Printed lines of a man(7) description section that are long, mostly-Japanese prose."""
    return [t for t in output_lines(body) if len(t) >= 80 and sum(map(is_japanese, t)) >= len(t) / 2]


def read_pages(man: Path):
    """(name, section, is_alias, roff lines) per installed page; a symlinked alias
    (telinit -> init) is a page of its own name with its target's text."""
    for path in sorted(man.glob("man*/*.gz")):
        stem = path.name[: -len(".gz")]
        name, _, section = stem.rpartition(".")
        text = gzip.decompress(path.resolve().read_bytes()).decode("utf-8", errors="replace")
        lines = text.splitlines()
        if lines and lines[0].startswith(".so "):
            continue  # a roff redirect: the page it names is read on its own
        yield name, section[:1], path.is_symlink(), lines


def in_val(name: str) -> bool:
    """About VAL_PERCENT of names, by a hash of the name (stable across runs and file order)."""
    return hashlib.sha256(name.encode()).digest()[0] * 100 // 256 < VAL_PERCENT


def write_jsonl(path: Path, rows: list) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("cache"), help="where the .deb is (or goes)")
    ap.add_argument("--deb", type=Path, help="the manpages-ja .deb (default: looked for in --cache)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--prose-kb", type=int, default=300, help="cap on prose.jsonl's size")
    args = ap.parse_args()

    deb = args.deb or find_deb(args.cache)
    man = extract(deb, args.cache / "manpages-ja")

    pairs, prose, prose_bytes, pages, no_name = {}, [], 0, 0, 0
    for name, section, alias, lines in read_pages(man):
        pages += 1
        secs = sections(lines)
        body = next((secs[h] for h in secs if h in NAME_HEADINGS), None)
        desc = description(name, body) if body else None
        if not desc:
            no_name += 1
            continue
        instruction = f"{name} ({section}) は何をするものですか？"
        pairs.setdefault((name, section), {"instruction": instruction, "output": desc})
        is_mdoc = any(l.startswith(".Sh") for l in lines)
        if alias or is_mdoc:
            continue  # an alias repeats its target; mdoc prose is mostly macros
        for p in prose_paragraphs(next((secs[h] for h in secs if h in PROSE_HEADINGS), [])):
            line = json.dumps({"text": p}, ensure_ascii=False)
            if prose_bytes + len(line.encode()) < args.prose_kb * 1024:
                prose.append({"text": p})
                prose_bytes += len(line.encode()) + 1

    keys = sorted(pairs)
    train = [pairs[k] for k in keys if not in_val(k[0])]
    val = [pairs[k] for k in keys if in_val(k[0])]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "val.jsonl", val)
    write_jsonl(args.out / "prose.jsonl", prose)
    print(f"{deb.name}: {pages} pages ({no_name} without a NAME description)")
    print(f"pairs: {len(keys)} (train {len(train)}, val {len(val)}); prose paragraphs: {len(prose)} "
          f"({prose_bytes // 1024} KB) -> {args.out}")


if __name__ == "__main__":
    main()
