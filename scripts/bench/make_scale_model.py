#!/usr/bin/env python3
"""Random-weight Hugging Face model directories for the scale benchmark (scripts/bench/scale.sh).

    python scripts/bench/make_scale_model.py SHAPE [--out DIR] [--seed 0] [--force]
    python scripts/bench/make_scale_model.py --list

Shapes (the architecture's exact sizes; only the weights are random):
  rinna36      GPT-NeoX, rinna/japanese-gpt-neox-3.6b's config: 36 layers, hidden 2816, 22 heads,
               intermediate 11264, vocab 32000, rotary_pct 1.0, rotary_emb_base 10000, context
               2048, sequential residual (use_parallel_residual false), LayerNorm eps 1e-5, gelu,
               untied head, bos 2 / eos 3. 3.61e9 parameters, 7.2 GB in bf16.
  llama8b      Llama, Meta-Llama-3-8B's shape: 32 layers, hidden 4096, 32 heads / 8 KV heads,
               intermediate 14336, vocab 128256, rope_theta 500000, RMSNorm eps 1e-5, untied.
               8.03e9 parameters, 16.1 GB in bf16.
  tiny         GPT-NeoX as rinna36 but 2 layers, hidden 256, 4 heads, intermediate 1024, vocab
               1000 (the pipeline test: runs in seconds; 256 so that every row is a multiple of
               q4_k's 256-value block, as in the big shapes).
  tiny-llama   Llama as llama8b but 2 layers, hidden 256, 4 heads / 2 KV heads, intermediate 768,
               vocab 1000.

Written to DIR (default ${KAIZEN_CACHE:-cache}/scale/SHAPE): config.json, safetensors shards of
at most 2 GB (model-0000i-of-0000n.safetensors + model.safetensors.index.json; a single
model.safetensors when it all fits one), bf16, and a tokenizer (tokenizer.json +
tokenizer_config.json: the 600-token byte-level BPE of tests/fixtures/tokenizers/bpe, which
kaizen and transformers both read; its ids fit every shape's vocabulary; text only serves as a
source of token ids, the model never saw any).

Weights: every matrix and embedding ~ N(0, 0.02) (HF's initializer_range), norm weights 1, biases
and norm biases 0. Each tensor has its own generator seeded from --seed and the tensor's name
(crc32), so a tensor does not depend on the order of writing. Tensors are generated and written
in slices of at most 64 Mi elements straight into the shard file (the safetensors header is
computed up front from the shapes), so the script never holds more than one slice (~400 MB).

Idempotent: DIR/.kaizen-scale.json records the shape, seed and config; when it matches, nothing is
done. A DIR without a matching marker is refused unless --force (then rebuilt). The directory is
built as DIR.partial and renamed when complete, so an interrupted run leaves no half model.
Prints the directory on stdout.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "bpe")
TOKENIZER_VOCAB = 600
SHARD_BYTES = 2 * 1000**3  # at most 2 GB per shard (a single tensor over that gets a shard alone)
SLICE = 64 * 1024 * 1024  # elements generated at once
STD = 0.02
MARKER = ".kaizen-scale.json"
VERSION = 1


def neox_config(layers, hidden, heads, inter, vocab, ctx):
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "classifier_dropout": 0.1,
        "eos_token_id": 3,
        "hidden_act": "gelu",
        "hidden_dropout": 0.0,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": ctx,
        "model_type": "gpt_neox",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_parallel_residual": False,
        "vocab_size": vocab,
    }


def llama_config(layers, hidden, heads, kv_heads, inter, vocab, ctx):
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,  # the BPE tokenizer's <|endoftext|> (Llama 3's own 128000 is not in it)
        "eos_token_id": 2,  # its <|im_end|>
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": ctx,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }


SHAPES = {
    "rinna36": neox_config(36, 2816, 22, 11264, 32000, 2048),
    "llama8b": llama_config(32, 4096, 32, 8, 14336, 128256, 8192),
    "tiny": neox_config(2, 256, 4, 1024, 1000, 2048),
    "tiny-llama": llama_config(2, 256, 4, 2, 768, 1000, 8192),
}


def tensors(cfg):
    """[(name, shape, init)] in HF's names and file order; init is "normal", "ones" or "zeros"."""
    d, L, V, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    out = []
    if cfg["model_type"] == "gpt_neox":
        out.append(("gpt_neox.embed_in.weight", (V, d), "normal"))
        for i in range(L):
            p = f"gpt_neox.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (d,), "ones"),
                (p + "input_layernorm.bias", (d,), "zeros"),
                (p + "attention.query_key_value.weight", (3 * d, d), "normal"),
                (p + "attention.query_key_value.bias", (3 * d,), "zeros"),
                (p + "attention.dense.weight", (d, d), "normal"),
                (p + "attention.dense.bias", (d,), "zeros"),
                (p + "post_attention_layernorm.weight", (d,), "ones"),
                (p + "post_attention_layernorm.bias", (d,), "zeros"),
                (p + "mlp.dense_h_to_4h.weight", (ff, d), "normal"),
                (p + "mlp.dense_h_to_4h.bias", (ff,), "zeros"),
                (p + "mlp.dense_4h_to_h.weight", (d, ff), "normal"),
                (p + "mlp.dense_4h_to_h.bias", (d,), "zeros"),
            ]
        out += [("gpt_neox.final_layer_norm.weight", (d,), "ones"),
                ("gpt_neox.final_layer_norm.bias", (d,), "zeros"),
                ("embed_out.weight", (V, d), "normal")]
    elif cfg["model_type"] == "llama":
        hd = d // cfg["num_attention_heads"]
        q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
        out.append(("model.embed_tokens.weight", (V, d), "normal"))
        for i in range(L):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (d,), "ones"),
                (p + "self_attn.q_proj.weight", (q, d), "normal"),
                (p + "self_attn.k_proj.weight", (kv, d), "normal"),
                (p + "self_attn.v_proj.weight", (kv, d), "normal"),
                (p + "self_attn.o_proj.weight", (d, q), "normal"),
                (p + "post_attention_layernorm.weight", (d,), "ones"),
                (p + "mlp.gate_proj.weight", (ff, d), "normal"),
                (p + "mlp.up_proj.weight", (ff, d), "normal"),
                (p + "mlp.down_proj.weight", (d, ff), "normal"),
            ]
        out += [("model.norm.weight", (d,), "ones"), ("lm_head.weight", (V, d), "normal")]
    else:
        raise ValueError(cfg["model_type"])
    return out


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def n_params(cfg):
    return sum(numel(s) for _, s, _ in tensors(cfg))


def plan_shards(ts):
    """Group tensors in order into shards of <= SHARD_BYTES (bf16: 2 bytes an element)."""
    shards, cur, size = [], [], 0
    for t in ts:
        b = 2 * numel(t[1])
        if cur and size + b > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += b
    if cur:
        shards.append(cur)
    return shards


def write_shard(path, ts, seed, torch):
    header, off = {}, 0
    for name, shape, _ in ts:
        b = 2 * numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + b]}
        off += b
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # 8-byte aligned data, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape, init in ts:
            n = numel(shape)
            if init == "normal":
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                for lo in range(0, n, SLICE):
                    x = torch.randn(min(SLICE, n - lo), generator=g, dtype=torch.float32)
                    x.mul_(STD)
                    f.write(x.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                    del x
            else:
                v = torch.full((n,), 1.0 if init == "ones" else 0.0, dtype=torch.bfloat16)
                f.write(v.view(torch.int16).numpy().tobytes())
    return off


def marker_for(shape, cfg, seed):
    return {"version": VERSION, "shape": shape, "seed": seed, "std": STD, "config": cfg,
            "params": n_params(cfg), "tokenizer": "tests/fixtures/tokenizers/bpe"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    ap.add_argument("--out", help="model directory (default ${KAIZEN_CACHE:-cache}/scale/SHAPE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild a directory whose marker differs")
    ap.add_argument("--list", action="store_true", help="print the shapes with parameter counts and exit")
    a = ap.parse_args()
    if a.list:
        for k, cfg in SHAPES.items():
            n = n_params(cfg)
            print(f"{k}: {n} params, {2 * n / 1e9:.2f} GB bf16, {len(plan_shards(tensors(cfg)))} shard(s)")
        return
    if not a.shape:
        ap.error("give a SHAPE (or --list)")
    cfg = SHAPES[a.shape]
    out = a.out or os.path.join(os.environ.get("KAIZEN_CACHE", "cache"), "scale", a.shape)
    want = marker_for(a.shape, cfg, a.seed)
    mpath = os.path.join(out, MARKER)
    if os.path.exists(out):
        try:
            have = json.load(open(mpath))
        except (OSError, ValueError):
            have = None
        if have == want:
            print(out)
            return
        if not a.force:
            sys.exit(f"make_scale_model: {out} exists but is not this shape/seed "
                     f"({'no marker' if have is None else 'marker differs'}); remove it or pass --force")
        shutil.rmtree(out)

    import torch  # noqa: E402  (only needed to build)

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    ts = tensors(cfg)
    total = sum(2 * numel(s) for _, s, _ in ts)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out)) if os.path.exists(os.path.dirname(os.path.abspath(out))) else ".").free
    if free < total + 1e9:
        sys.exit(f"make_scale_model: {a.shape} needs {total / 1e9:.1f} GB on disk, {free / 1e9:.1f} GB free")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = plan_shards(ts)
    t0 = time.time()
    weight_map = {}
    for i, group in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(tmp, fname), group, a.seed, torch)
        for name, _, _ in group:
            weight_map[name] = fname
        print(f"make_scale_model: {a.shape}: wrote {fname} ({len(group)} tensors, {time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    assert cfg["vocab_size"] >= TOKENIZER_VOCAB
    for t in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, t), os.path.join(tmp, t))
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(want, f, indent=2)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.rename(tmp, out)
    print(f"make_scale_model: {a.shape}: {n_params(cfg)} params, {total / 1e9:.2f} GB in {len(shards)} "
          f"shard(s), {time.time() - t0:.0f} s", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
