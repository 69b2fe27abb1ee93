#!/usr/bin/env python3
"""Reference numbers for SmolLM2-135M-Instruct (Q4_1 GGUF) from PyTorch + HF transformers.

    python scripts/reference/smollm2.py --gguf cache/SmolLM2-135M-Instruct.Q4_1.gguf \
        --botchan cache/botchan.txt --out scripts/reference/smollm2.json

transformers reads the GGUF itself: `gguf.dequantize` turns every tensor (Q4_1 / Q8_0 / F32) into
float32, the Llama tensor processor undoes llama.cpp's Q/K row permutation, and the model is a plain
f32 `LlamaForCausalLM` with tied embeddings. The tokenizer is rebuilt from the GGUF metadata
(byte-level BPE, GPT-2 split regex, `<|im_start|>` etc. as special tokens, no BOS added).
transformers has no split rule for `tokenizer.ggml.pre=smollm` (llama.cpp: split every digit, then
the GPT-2 regex), so it keeps GPT-2's; the vocabulary has no multi-digit or space+digit token, so
the ids come out the same (digits are single tokens either way).

Writes (all small, meant to be committed):
  --out  JSON with (a) the eval references (mean next-token NLL / perplexity on 256 botchan tokens,
         per-token NLLs and argmax ids), (b) token ids of a few texts, (c) the chat-template
         rendering and greedy continuation of one prompt, (d) versions and input checksums.
  botchan_256.jsonl, botchan_head_256.jsonl (beside --out): one JSONL line {"text": EVAL_TEXT}
         each, so that `kaizen eval --max-len 256` on them reproduces (a).

Eval text definition (EVAL_TEXT), primary ("eval", file botchan_256.jsonl):
  botchan.txt (sha256 464bd530...) decoded as UTF-8; the leading BOM (U+FEFF) removed; every "\r\n"
  replaced by "\n" (call the result S); S cut to start at the first occurrence of
  "A NOTE BY THE TRANSLATOR" (the first English prose after the Project Gutenberg header; char
  offset 787 of S); tokenized with the HF tokenizer's defaults (no BOS/EOS added); the first 256
  ids kept; EVAL_TEXT = tokenizer.decode(those 256 ids). The script asserts that EVAL_TEXT is a
  prefix of the cut text and tokenizes to exactly those 256 ids again, so no truncation is needed.
  NLL = mean over the 255 positions t=0..254 of -log softmax(logits[t])[ids[t+1]];
  perplexity = exp(NLL). No BOS is prepended (tokenizer.ggml.add_bos_token is false).
Secondary ("eval_file_start", file botchan_head_256.jsonl): the same, but from the start of S
  (the Gutenberg licence header, which the model predicts much better).
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time

import torch

TOKEN_TEXTS = {
    "english": "Hello, world! This is a simple test of the tokenizer.",
    "japanese": "こんにちは、世界。日本語のテキストです。",
    "digits": "12345",
    "digits_in_text": "In 2024, pi was 3.14159 and x = 100.",
    "code": "def add(a, b):\n    return a + b\n",
    "emoji": "I love 🦀 and 🐍! 👍🏽",
    "leading_spaces": "   three leading spaces,  two inner\tand a tab",
    "newlines": "line one\n\n\nline four\r\n",
    "accents": "café naïve résumé",
    "chatml": "<|im_start|>user\nHi<|im_end|>",
}

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
EVAL_TOKENS = 256
GEN_TOKENS = 24
# (key in the JSON, JSONL file, start marker in the normalized text or None for its start)
EVALS = [
    ("eval", "botchan_256.jsonl", "A NOTE BY THE TRANSLATOR"),
    ("eval_file_start", "botchan_head_256.jsonl", None),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def load(gguf_path, dtype=torch.float32):
    """Tokenizer and model straight from the GGUF (all tensors dequantized, then cast to dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
    model.eval()
    return tok, model


def normalized_botchan(path):
    """botchan.txt as UTF-8, BOM removed, CRLF -> LF."""
    with open(path, "rb") as f:
        s = f.read().decode("utf-8")
    if s.startswith("\ufeff"):
        s = s[1:]
    return s.replace("\r\n", "\n")


def eval_text(s, marker, tok):
    """(start offset, EVAL_TEXT, its 256 ids): see the module docstring."""
    start = 0
    if marker is not None:
        start = s.find(marker)
        assert start >= 0, f"marker {marker!r} not found"
    s = s[start:]
    ids = tok(s, add_special_tokens=True)["input_ids"]
    assert len(ids) >= EVAL_TOKENS, len(ids)
    ids = ids[:EVAL_TOKENS]
    text = tok.decode(ids)
    assert s.startswith(text), "decoded ids are not a prefix of the text"
    again = tok(text, add_special_tokens=True)["input_ids"]
    assert again == ids, "EVAL_TEXT does not re-tokenize to the same 256 ids"
    return start, text, ids


@torch.no_grad()
def nll_of(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    tok_nll = -logp.gather(1, x[0, 1:, None])[:, 0]
    return tok_nll, logits


def eval_entry(model, s, marker, tok, jsonl_name, per_token=True):
    start, text, ids = eval_text(s, marker, tok)
    tok_nll, logits = nll_of(model, ids)
    nll = tok_nll.mean().item()
    entry = {
        "jsonl_file": jsonl_name,
        "start_marker": marker,
        "start_char_offset": start,
        "num_tokens": len(ids),
        "num_predictions": len(ids) - 1,
        "bos_prepended": False,
        "text_chars": len(text),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_head": text[:80],
        "text_tail": text[-80:],
        "nll": round(nll, 6),
        "perplexity": round(math.exp(nll), 4),
        "input_ids": ids,
        "token_nll": [round(v, 4) for v in tok_nll.tolist()],
        "argmax_next": logits.argmax(-1).tolist(),
        "logits_pos0_first8": [round(v, 4) for v in logits[0, :8].tolist()],
        "logits_last_first8": [round(v, 4) for v in logits[-1, :8].tolist()],
    }
    if not per_token:
        for k in ("token_nll", "argmax_next", "logits_pos0_first8", "logits_last_first8"):
            del entry[k]
    return entry, text


@torch.no_grad()
def greedy(model, tok, prompt_ids, n):
    """HF generate, greedy, stopping at EOS (<|im_end|>) like generate's defaults."""
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    new_ids = out[0, len(prompt_ids):].tolist()
    return {"max_new_tokens": n, "stop_at_eos": True, "new_ids": new_ids, "num_new": len(new_ids),
            "text": tok.decode(new_ids, skip_special_tokens=False)}


@torch.no_grad()
def greedy_no_stop(model, tok, prompt_ids, n):
    """Plain argmax loop (full recompute each step, no cache): EOS is an ordinary token, so this
    always yields n ids (unlike min_new_tokens, which masks EOS and changes the continuation)."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    new_ids = ids[len(prompt_ids):]
    return {"max_new_tokens": n, "stop_at_eos": False, "new_ids": new_ids, "num_new": len(new_ids),
            "text": tok.decode(new_ids, skip_special_tokens=False)}


def compact_json(obj):
    """indent=1, but lists of scalars on one line (keeps the file small and diffable)."""
    import re

    text = json.dumps(obj, ensure_ascii=False, indent=1)
    return re.sub(
        r"\[\n\s*((?:-?[0-9.e+-]+|true|false|null),?\s*)+\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]",
        text,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--botchan", required=True, help="botchan.txt from the sentencepiece 0.2.3 sdist")
    ap.add_argument("--out", required=True, help="output JSON (e.g. scripts/reference/smollm2.json)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out_dir = os.path.dirname(os.path.abspath(args.out))

    t0 = time.time()
    tok, model = load(args.gguf)
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    cfg = model.config

    # (a) eval references
    s = normalized_botchan(args.botchan)
    evals, texts = {}, {}
    for key, jsonl_name, marker in EVALS:
        evals[key], texts[jsonl_name] = eval_entry(model, s, marker, tok, jsonl_name, per_token=key == "eval")
        print(f"{key}: nll {evals[key]['nll']:.4f}, ppl {evals[key]['perplexity']:.3f}", file=sys.stderr)

    # (b) tokenizer ids
    tokens = {}
    for key, text in TOKEN_TEXTS.items():
        ids = tok(text)["input_ids"]
        tokens[key] = {
            "text": text,
            "ids": ids,
            "pieces": tok.convert_ids_to_tokens(ids),
            "decode_roundtrip": tok.decode(ids) == text,
        }

    # (c) chat template + greedy continuation
    rendered = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    chat = {
        "messages": CHAT_MESSAGES,
        "add_generation_prompt": True,
        "rendered": rendered,
        "prompt_ids": prompt_ids,
        "greedy": greedy(model, tok, prompt_ids, GEN_TOKENS),
        "greedy_no_stop": greedy_no_stop(model, tok, prompt_ids, GEN_TOKENS),
    }
    assert chat["greedy_no_stop"]["new_ids"][: chat["greedy"]["num_new"]] == chat["greedy"]["new_ids"]
    print(f"greedy: {chat['greedy']['text']!r}", file=sys.stderr)
    print(f"greedy_no_stop: {chat['greedy_no_stop']['text']!r}", file=sys.stderr)

    result = {
        "definition": {
            "eval_text": (
                "botchan.txt decoded as UTF-8, leading BOM (U+FEFF) removed, every CRLF replaced by LF; "
                "cut to start at start_marker (null: the start of the file); tokenized with the HF GGUF "
                "tokenizer's defaults (no BOS/EOS added); first 256 ids kept; text = decode(those ids), a "
                "prefix of the cut text that re-tokenizes to exactly the same 256 ids (stored as the one "
                "line {\"text\": ...} of jsonl_file)."
            ),
            "nll": "mean over the 255 positions t of -log softmax(logits[t])[ids[t+1]]; perplexity = exp(nll)",
            "model": "all GGUF tensors dequantized to f32 by transformers/gguf, forward in f32 (CPU, SDPA)",
            "greedy": "HF generate, do_sample=False, max_new_tokens=24, stops at EOS <|im_end|>",
            "greedy_no_stop": "argmax loop for 24 new tokens, EOS treated as an ordinary token (no masking)",
        },
        "model": {
            "gguf": os.path.basename(args.gguf),
            "gguf_sha256": sha256_file(args.gguf),
            "loader": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)",
            "model_class": type(model).__name__,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope": getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None),
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        "botchan_sha256": sha256_file(args.botchan),
        **evals,
        "tokens": tokens,
        "chat": chat,
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "numpy", "jinja2")},
            "torch_threads": torch.get_num_threads(),
        },
    }

    def write(path, content):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(path + ".tmp", path)

    write(args.out, compact_json(result) + "\n")
    for name, text in texts.items():
        write(os.path.join(out_dir, name), json.dumps({"text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {args.out} and {', '.join(texts)} ({time.time() - t0:.1f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
