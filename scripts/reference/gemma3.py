#!/usr/bin/env python3
"""Reference numbers for Gemma 3 270M base (Q4_K_M GGUF) from PyTorch + HF transformers.

    python scripts/reference/gemma3.py --gguf cache/gemma-3-270m-q4_k_m.gguf \\
        --botchan cache/botchan.txt --deb cache/manpages-ja_0.5.0.0.20221215+dfsg-1_all.deb \\
        --out scripts/reference/gemma3.json

(`bash scripts/fetch_assets.sh` fetches the GGUF and botchan.txt; `apt-get download manpages-ja`
the .deb, which the script reads with dpkg-deb.) Gemma 3 is provided under and subject to the Gemma
Terms of Use: the GGUF stays in the git-ignored cache; what this script writes holds ids, numbers
and the two eval texts (botchan.txt, public domain; a manpages-ja excerpt, freely licensed), no
weights and no vocabulary strings.

What transformers 5.23 does with this GGUF (read from its source; recorded under "gguf_handling" in
the JSON, with the derived config under "model"; the tensor handling is checked bit for bit on every
run), i.e. what a loader must do to get the same f32 model:

* Config: gemma3 is not one of the architectures transformers' newer GGUF config reader covers,
  so the legacy reader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, mapping
  `integrations/ggml.py` GGUF_CONFIG_MAPPING["gemma3"]) reads only
  context_length -> max_position_embeddings, block_count -> num_hidden_layers,
  feed_forward_length -> intermediate_size, embedding_length -> hidden_size,
  attention.head_count -> num_attention_heads, attention.head_count_kv -> num_key_value_heads,
  attention.key_length -> head_dim, attention.layer_norm_rms_epsilon -> rms_norm_eps (the f32
  value widened: 9.999999974752427e-07), attention.sliding_window -> sliding_window,
  rope.freq_base -> rope_parameters.full_attention.rope_theta, tokenizer.ggml.{bos,eos,
  unknown,padding}_token_id -> bos/eos/unk/pad ids, vocab_size from the token list (262144; the
  HF checkpoint's 262208 rows were cut to the real vocabulary by llama.cpp's converter), and
  tie_word_embeddings = (no `output.weight` tensor). Everything else is Gemma3TextConfig's
  default, NOT read from the file: query_pre_attn_scalar 256 (attention scale 256^-0.5 = 1/16;
  llama.cpp uses 1/sqrt(key_length) = 1/16 too, but the two differ for other head sizes),
  layer_types from sliding_window_pattern 6 (layer i is full attention iff (i+1) % 6 == 0:
  layers 5, 11, 17; llama.cpp's default is the same and it would also honour a
  `gemma3.attention.sliding_window_pattern` key, which transformers ignores; this file has
  none), rope_parameters.sliding_attention.rope_theta 10000 (the file has no
  `gemma3.rope.freq_base_swa`; transformers would ignore it anyway), no rope scaling (this file
  has none; transformers would ignore `gemma3.rope.scaling.*`), final_logit_softcapping and
  attn_logit_softcapping None (transformers ignores `gemma3.final_logit_softcapping`),
  hidden_activation gelu_pytorch_tanh, value head size = head_dim (attention.value_length is
  not read).
* Tensors: every tensor goes through `gguf.quants.dequantize` (numpy, float32), then the
  Gemma2TensorProcessor (used for gemma3) subtracts 1 (float32) from every tensor whose GGUF name
  contains "norm.weight": attn_norm, attn_q_norm, attn_k_norm, post_attention_norm, ffn_norm,
  post_ffw_norm and output_norm. llama.cpp's converter stores Gemma's RMSNorm gains as 1 + w
  (Gemma3RMSNorm computes x_normed * (1 + w)), so the HF weight is fl32(stored - 1) and the model
  multiplies by fl32(1 + that). No Q/K row permutation (llama.cpp's converter permutes only for
  Llama-style models; Gemma's rotary is the rotate-half / NeoX layout on both sides), no
  transposition beyond reading the GGUF shape [ne0=in, ne1=out] as the (out, in) matrix. The LM
  head is the (dequantized Q8_0) token embedding; embeddings are scaled by sqrt(hidden) =
  fl32(sqrt(640)) = 25.298220... inside the model.
* Name map (GGUF -> HF), note the two norm-name traps: post_attention_norm is HF
  post_attention_layernorm (after attention, before the residual add) and ffn_norm is HF
  pre_feedforward_layernorm (Llama's ffn_norm is its post_attention_layernorm).
* Tensor types in this file: token_embd Q8_0; per layer attn_q, attn_k, ffn_gate, ffn_up Q5_0
  (their rows are 640 long, not a multiple of the 256 K-quant block), attn_v Q8_0 or Q5_0,
  attn_output Q4_K (rows 1024), ffn_down Q6_K or Q4_K (rows 2048), all norms F32; each tensor's
  type is listed under "gguf_tensor_types".
* Tokenizer: tokenizer.ggml.model "llama" with architecture gemma3 selects transformers'
  `gemma_tokenizer`: a GemmaTokenizer (BPE with byte fallback, " " -> "▁", no pre-split, no
  dummy prefix) whose merges are rebuilt from the vocabulary with the file's token ORDER as the
  rank (not its scores); control tokens (type 3) are special, user-defined ones (type 4) are
  matched whole. tokenizer.ggml.add_bos_token is true, so encoding prepends <bos> (id 2).

Writes (all small, meant to be committed):
  --out  JSON: (a) eval references on 256 tokens of botchan.txt (English) and of Japanese prose
         (mean next-token NLL, perplexity, per-token NLLs, argmax ids), (b) greedy continuations
         (24 tokens, plain argmax, no EOS stop, with each step's top-1 minus top-2 logit margin)
         of "日本の首都は" and an English prompt, (c) versions and input checksums, (d) the GGUF
         handling above: derived config, GGUF metadata (token arrays only as lengths), tensor
         types, name map, and the bit-exact checks.
  gemma3_botchan_256.jsonl, gemma3_ja_256.jsonl (beside --out): one line {"text": EVAL_TEXT}
         each, so that `kaizen eval --max-len 256` (BOS prepended, as the tokenizer does by
         default) reproduces (a).

Eval texts (EVAL_TEXT):
  botchan ("eval", gemma3_botchan_256.jsonl): botchan.txt (sha256 464bd530...) as smollm2.py
    defines it (UTF-8, BOM removed, CRLF -> LF), cut to start at "A NOTE BY THE TRANSLATOR".
  Japanese ("eval_ja", gemma3_ja_256.jsonl): the description section (`.SH 説明`) of symlink(7)
    from Debian's manpages-ja 0.5.0.0.20221215+dfsg-1 (usr/share/man/ja/man7/symlink.7.gz), as
    scripts/data/manpages_ja.py reads it: its prose_paragraphs() (printed lines of >= 80
    characters, at least half Japanese) joined with "\\n". symlink(7) is prose from its first line
    (ls(1)'s description is mostly an option table).
  Each is tokenized with the GGUF tokenizer's defaults (BOS prepended, no EOS); the first 256 ids
  (BOS + 255 text tokens) are kept; EVAL_TEXT = decode(those ids without BOS), asserted to be a
  prefix of the text that re-tokenizes to exactly the same 256 ids.
  NLL = mean over the 255 positions t=0..254 of -log softmax(logits[t])[ids[t+1]] (the BOS itself
  is not predicted; the first predicted token is the first text token, from BOS);
  perplexity = exp(NLL).
"""

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a progress bar

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "data"))
from smollm2 import compact_json, normalized_botchan, sha256_file, version  # noqa: E402

EVAL_TOKENS = 256
GEN_TOKENS = 24
BOTCHAN_MARKER = "A NOTE BY THE TRANSLATOR"
JA_PAGE = "./usr/share/man/ja/man7/symlink.7.gz"
PROMPTS = {"japanese": "日本の首都は", "english": "The capital of France is"}
# /work/shared/ASSETS.md: the GGUF tokenizer in transformers gives these ids (BOS first).
KNOWN_IDS = ("吾輩は猫である。名前はまだ無い。",
             [2, 242058, 241987, 237048, 239959, 15785, 236924, 67657, 237048, 43452, 82370, 236924])

# GGUF tensor name (after "blk.N.") -> HF module path (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF metadata key (after "gemma3.") -> the HF config field transformers fills from it
GGUF_KEY_TO_HF = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_parameters.full_attention.rope_theta",
}
# GGUF keys llama.cpp reads for gemma3 that transformers 5.23 ignores (absent from this file)
IGNORED_BY_TRANSFORMERS = [
    "gemma3.attention.value_length (transformers uses head_dim)",
    "gemma3.attention.sliding_window_pattern (int or per-layer bool array; transformers: pattern 6)",
    "gemma3.rope.freq_base_swa (transformers: 10000)",
    "gemma3.rope.scaling.type / .factor (transformers: no scaling)",
    "gemma3.final_logit_softcapping (transformers: None)",
]


def hf_name(gguf_name):
    base, suffix = gguf_name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, rest = base.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[rest]}.{suffix}"
    return f"{TOP_NAMES[base]}.{suffix}"


def load(gguf_path):
    """Tokenizer and model straight from the GGUF (all tensors dequantized to f32), eager attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return tok, model


def japanese_text(deb):
    """symlink(7)'s description prose from the manpages-ja .deb (see the module docstring)."""
    import manpages_ja

    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        gz = tf.extractfile(JA_PAGE).read()
    roff = gzip.decompress(gz).decode("utf-8")
    secs = manpages_ja.sections(roff.splitlines())
    body = next(secs[h] for h in secs if h in manpages_ja.PROSE_HEADINGS)
    text = "\n".join(manpages_ja.prose_paragraphs(body))
    source = {
        "deb": os.path.basename(deb),
        "deb_sha256": sha256_file(deb),
        "member": JA_PAGE,
        "member_gz_sha256": hashlib.sha256(gz).hexdigest(),
        "roff_sha256": hashlib.sha256(roff.encode("utf-8")).hexdigest(),
        "section": "説明",
        "extraction": "scripts/data/manpages_ja.py: sections(), prose_paragraphs(), joined with \\n",
        "full_text_chars": len(text),
        "full_text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    return text, source


def eval_text(s, tok):
    """(EVAL_TEXT, its 256 ids incl. BOS): see the module docstring."""
    ids = tok(s)["input_ids"]
    assert ids[0] == tok.bos_token_id, "the tokenizer no longer prepends BOS by default"
    assert len(ids) >= EVAL_TOKENS, len(ids)
    ids = ids[:EVAL_TOKENS]
    text = tok.decode(ids[1:])
    assert s.startswith(text), "decoded ids are not a prefix of the text"
    again = tok(text)["input_ids"]
    assert again == ids, "EVAL_TEXT does not re-tokenize to the same 256 ids"
    return text, ids


@torch.no_grad()
def nll_of(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x, use_cache=False).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    tok_nll = -logp.gather(1, x[0, 1:, None])[:, 0]
    return tok_nll, logits


def eval_entry(model, tok, s, jsonl_name, extra):
    text, ids = eval_text(s, tok)
    tok_nll, logits = nll_of(model, ids)
    nll = tok_nll.mean().item()
    top2 = logits.topk(2, dim=-1).values
    entry = {
        "jsonl_file": jsonl_name,
        **extra,
        "num_tokens": len(ids),
        "num_predictions": len(ids) - 1,
        "bos_prepended": True,
        "text_chars": len(text),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_head": text[:80],
        "text_tail": text[-80:],
        "nll": round(nll, 6),
        "perplexity": round(math.exp(nll), 4),
        "input_ids": ids,
        "token_nll": [round(v, 4) for v in tok_nll.tolist()],
        "argmax_next": logits.argmax(-1).tolist(),
        "min_top2_margin": round(float((top2[:, 0] - top2[:, 1]).min()), 6),
        "logits_pos0_first8": [round(v, 4) for v in logits[0, :8].tolist()],
        "logits_last_first8": [round(v, 4) for v in logits[-1, :8].tolist()],
    }
    return entry, text


@torch.no_grad()
def greedy(model, tok, prompt):
    """Plain argmax, full recompute each step (no cache), EOS an ordinary token; then HF generate
    with the KV cache (eos_token_id None) must give the same ids."""
    prompt_ids = tok(prompt)["input_ids"]
    ids, margins = list(prompt_ids), []
    for _ in range(GEN_TOKENS):
        top2 = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].topk(2)
        ids.append(int(top2.indices[0]))
        margins.append(round(float(top2.values[0] - top2.values[1]), 5))
    new_ids = ids[len(prompt_ids):]
    x = torch.tensor([prompt_ids])
    model.generation_config.eos_token_id = None  # EOS must not stop: exactly GEN_TOKENS come out
    model.generation_config.pad_token_id = tok.pad_token_id
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=GEN_TOKENS)
    cached = out[0, len(prompt_ids):].tolist()
    assert cached == new_ids, (cached, new_ids)
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "text": tok.decode(new_ids),
        "top2_margins": margins,
        "min_top2_margin": min(margins),
        "cached_equals_uncached": True,
    }


@torch.no_grad()
def f64_check(model64, tok, evals, gen):
    """Rerun the evals and the greedy loops with every weight and activation in f64."""
    out = {}
    for key, e in evals.items():
        tok_nll, _ = nll_of(model64, e["input_ids"])
        out[key] = {"nll": round(tok_nll.mean().item(), 6),
                    "abs_diff_nll": float(f"{abs(tok_nll.mean().item() - e['nll']):.2e}"),
                    "max_abs_diff_token_nll": float(f"{float((tok_nll - torch.tensor(e['token_nll'], dtype=torch.float64)).abs().max()):.2e}")}
    for key, g in gen.items():
        ids = list(g["prompt_ids"])
        for _ in range(GEN_TOKENS):
            ids.append(int(model64(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        out[f"greedy_{key}_same_ids"] = ids[len(g["prompt_ids"]):] == g["new_ids"]
    out["note"] = ("model.double() on the same dequantized weights; max_abs_diff_token_nll is against the "
                   "f32 per-token NLLs as rounded to 4 decimals in this file")
    return out


def gguf_facts(gguf_path, model):
    """Metadata, tensor types, and the bit-exact check of transformers' weights against gguf-py."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges"):
            metadata[key] = f"<array of {len(field.data)}>"  # never the vocabulary itself
            continue
        value = field.contents()
        if isinstance(value, float):
            value = float(np.float32(value))
        metadata[key] = value

    state = model.state_dict()
    types, counts, shapes, checks = {}, {}, {}, {"norm_minus_one": [], "exact": []}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        types[t.name] = qtype
        counts[qtype] = counts.get(qtype, 0) + 1
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists ne0 (the row length) first
        shapes.setdefault(t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name, shape)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        name = hf_name(t.name)
        got = state[name]
        if "norm.weight" in t.name:
            assert torch.equal(got, w - 1.0), f"{name}: transformers' weight is not dequantize({t.name}) - 1"
            checks["norm_minus_one"].append(t.name)
        else:
            assert torch.equal(got, w), f"{name}: transformers' weight is not dequantize({t.name})"
            checks["exact"].append(t.name)
        del w
    tied = "output.weight" not in types
    if tied:
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert len(types) == len([k for k in state if not (tied and k == "lm_head.weight")]), "unmapped tensors"
    layer0 = {k: v for k, v in types.items() if k.startswith("blk.0.")}
    return {
        "metadata": metadata,
        "tensor_count": len(types),
        "tensor_type_counts": dict(sorted(counts.items())),
        "tensor_shapes_hf_order": shapes,  # (out, in) as the HF matrix; blk.* keys are per layer
        "layer0_types": layer0,
        "tensor_types": types,
        "bit_exact_checks": {
            "norm_minus_one": len(checks["norm_minus_one"]),
            "exact": len(checks["exact"]),
            "statement": ("every transformers parameter equals gguf-py's dequantize() of its GGUF tensor, "
                          "reshaped to reversed(ne), minus 1.0 (f32) for names containing 'norm.weight' "
                          "and unchanged otherwise (no Q/K permutation); lm_head is the embedding (tied)"),
        },
    }


def config_summary(model, tok):
    c = model.config
    emb = model.model.embed_tokens
    attn = model.model.layers[0].self_attn
    return {
        "model_class": type(model).__name__,
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "hidden_activation": c.hidden_activation,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "attention_scaling": attn.scaling,
        "sliding_window": c.sliding_window,
        "sliding_window_pattern": getattr(c, "_sliding_window_pattern", None),
        "layer_types": c.layer_types,
        "full_attention_layers": [i for i, t in enumerate(c.layer_types) if t == "full_attention"],
        "rope_parameters": c.rope_parameters,
        "rope_theta_global": c.rope_parameters["full_attention"]["rope_theta"],
        "rope_theta_local": c.rope_parameters["sliding_attention"]["rope_theta"],
        "rope_scaling": {k: v for k, v in c.rope_parameters["full_attention"].items() if k != "rope_theta"},
        "final_logit_softcapping": c.final_logit_softcapping,
        "attn_logit_softcapping": c.attn_logit_softcapping,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "embed_scale": float(emb.embed_scale),
        "use_bidirectional_attention": c.use_bidirectional_attention,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tokenizer": {
            "class": type(tok).__name__,
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "unk": [tok.unk_token, tok.unk_token_id],
            "adds_bos": tok("a")["input_ids"][0] == tok.bos_token_id,
            "adds_eos": tok("a")["input_ids"][-1] == tok.eos_token_id,
            "len": len(tok),
        },
        "params": sum(p.numel() for p in model.parameters()),  # tied embedding once
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--botchan", required=True, help="botchan.txt from the sentencepiece 0.2.3 sdist")
    ap.add_argument("--deb", required=True, help="manpages-ja_0.5.0.0.20221215+dfsg-1_all.deb")
    ap.add_argument("--out", required=True, help="output JSON (e.g. scripts/reference/gemma3.json)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out_dir = os.path.dirname(os.path.abspath(args.out))

    t0 = time.time()
    tok, model = load(args.gguf)
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    text, want = KNOWN_IDS
    assert tok(text)["input_ids"] == want, tok(text)["input_ids"]

    # (a) eval references
    botchan = normalized_botchan(args.botchan)
    start = botchan.find(BOTCHAN_MARKER)
    assert start >= 0
    ja, ja_source = japanese_text(args.deb)
    evals, texts = {}, {}
    evals["eval"], texts["gemma3_botchan_256.jsonl"] = eval_entry(
        model, tok, botchan[start:], "gemma3_botchan_256.jsonl",
        {"source": "botchan.txt", "start_marker": BOTCHAN_MARKER, "start_char_offset": start})
    evals["eval_ja"], texts["gemma3_ja_256.jsonl"] = eval_entry(
        model, tok, ja, "gemma3_ja_256.jsonl", {"source": "manpages-ja symlink(7)", **ja_source})
    for key, e in evals.items():
        print(f"{key}: nll {e['nll']:.4f}, ppl {e['perplexity']:.3f}", file=sys.stderr)

    # (b) greedy continuations
    gen = {key: greedy(model, tok, prompt) for key, prompt in PROMPTS.items()}
    for key, g in gen.items():
        print(f"greedy {key}: {g['prompt']!r} -> {g['text']!r} (min margin {g['min_top2_margin']})", file=sys.stderr)

    # (d) what transformers did with the file
    facts = gguf_facts(args.gguf, model)

    # (e) the same model in f64: how far f32 rounding moves the numbers (tolerances, near ties)
    f64 = f64_check(model.double(), tok, evals, gen)
    print(f"f64: {f64}", file=sys.stderr)

    result = {
        "definition": {
            "eval_text": (
                "eval: botchan.txt as UTF-8, BOM removed, CRLF -> LF, cut at start_marker; eval_ja: the "
                "description prose of symlink(7) from manpages-ja (see eval_ja.extraction). Tokenized with the "
                "GGUF tokenizer's defaults (BOS prepended, no EOS); first 256 ids (BOS + 255) kept; text = "
                "decode(ids[1:]), a prefix of the source that re-tokenizes to exactly those 256 ids (stored as "
                "the one line {\"text\": ...} of jsonl_file; kaizen eval must prepend BOS like the tokenizer)."
            ),
            "nll": "mean over the 255 positions t of -log softmax(logits[t])[ids[t+1]]; perplexity = exp(nll)",
            "model": ("transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
                      "attn_implementation='eager'): all GGUF tensors dequantized to f32, forward in f32 on CPU"),
            "greedy": ("prompt encoded with BOS; 24 new tokens by a plain argmax loop (no cache, EOS an ordinary "
                       "token); equal to HF generate(do_sample=False, eos_token_id=None) with its KV cache; "
                       "top2_margins[i] = top-1 minus top-2 logit at step i"),
        },
        "model": {
            "gguf": os.path.basename(args.gguf),
            "gguf_sha256": sha256_file(args.gguf),
            "license": "Gemma Terms of Use: the GGUF is fetched (scripts/fetch_assets.sh), never committed",
            **config_summary(model, tok),
        },
        "botchan_sha256": sha256_file(args.botchan),
        **evals,
        "greedy": gen,
        "f64_check": f64,
        "gguf_handling": {
            "config_reader": "legacy modeling_gguf_pytorch_utils.load_gguf_checkpoint (gemma3 not in GGUF_CONFIG_ARCHS)",
            "config_from_file": {f"gemma3.{k}": v for k, v in GGUF_KEY_TO_HF.items()},
            "config_from_file_other": {
                "vocab_size": "len(tokenizer.ggml.tokens)",
                "tie_word_embeddings": "no output.weight tensor",
                "bos/eos/unk/pad_token_id": "tokenizer.ggml.{bos,eos,unknown,padding}_token_id",
            },
            "config_defaults_not_in_file": {
                "query_pre_attn_scalar": 256,
                "sliding_window_pattern": 6,
                "rope_parameters.sliding_attention.rope_theta": 10000.0,
                "rope_scaling": None,
                "final_logit_softcapping": None,
                "attn_logit_softcapping": None,
                "hidden_activation": "gelu_pytorch_tanh",
            },
            "gguf_keys_ignored_by_transformers": IGNORED_BY_TRANSFORMERS,
            "tensor_processor": "Gemma2TensorProcessor: weights - 1 (f32) for GGUF names containing 'norm.weight'",
            "norm_offset": ("llama.cpp stores Gemma RMSNorm gains as 1 + w; transformers subtracts 1, the model "
                            "multiplies by (1 + w): attn_norm, attn_q_norm, attn_k_norm, post_attention_norm, "
                            "ffn_norm, post_ffw_norm, output_norm"),
            "qk_permutation": "none (transformers does not permute for gemma3; llama.cpp's converter did not either)",
            "rope_layout": "rotate_half (NeoX) on both sides",
            "name_map": {**{f"blk.N.{k}": f"model.layers.N.{v}" for k, v in LAYER_NAMES.items()},
                         **{k: v for k, v in TOP_NAMES.items()}},
            **facts,
        },
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "numpy")},
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
