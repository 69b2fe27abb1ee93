#!/usr/bin/env python3
"""PyTorch + PEFT baseline for `kaizen train` speed: LoRA training steps on SmolLM2 on the CPU.

    python scripts/bench/train_torch.py --gguf cache/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data DIR/botchan.jsonl --dtype f32 --threads 2 --json

The model is loaded with transformers straight from the GGUF (every tensor dequantized to f32,
then cast to --dtype); loading is not timed. LoRA is attached with PEFT: r=8, lora_alpha=16,
dropout 0, target q_proj,v_proj, bias none. With --dtype bf16 the frozen base is bf16 and the
adapter stays f32 (PEFT's autocast_adapter_dtype=True default); the loss is computed in f32 by
transformers either way.

Data is built exactly as `kaizen train --max-len T --pack` builds it from a JSONL of {"text"}
lines: each line is tokenized with the GGUF tokenizer's default special tokens, EOS is appended
unless already last, the line is cut to T tokens, all lines are concatenated in file order and
split into rows of exactly T tokens (input_ids = labels; the model shifts them, so a row has T-1
predicted positions). Steps take rows in order (kaizen: --no-shuffle), --batch-size rows a step,
so step k sees the same rows on both sides and the first loss (LoRA B = 0) is the base model's.

Each step: forward with labels, loss.backward(), clip_grad_norm_(--max-grad-norm), AdamW step
(lr --lr, betas 0.9/0.999, eps 1e-8, weight_decay 0, as kaizen), zero_grad. The first --warmup
steps are not timed; s_step is the median time of the other steps (each from batch to updated
weights, as kaizen's per-step tokens_per_sec).

--json prints exactly one JSON line on stdout:
  {"impl": "pytorch", "dtype", "s_step", "tokens_per_sec", "gflop_per_step", "gflops",
   "peak_rss_mb", "losses", ...extra keys: step_seconds, grad_norms, load_peak_rss_mb, threads,
   attn_implementation, trainable_params, versions}
tokens_per_sec = batch * T / s_step (B*T positions, as kaizen counts them); gflops =
gflop_per_step / s_step, gflop_per_step from flops_per_step() below. peak_rss_mb is ru_maxrss of
this process (includes the load, where the GGUF is dequantized); load_peak_rss_mb is the same
taken right after loading.
"""

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization progress bar

import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notes

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def flops_per_step(cfg, batch, seq, r, n_targets_q, n_targets_v):
    """Useful FLOPs of one LoRA training step (multiply-add = 2 FLOPs), with T = batch * seq:

      forward            2 * N * T        N = matmul weights: per layer q,k,v,o + gate,up,down,
                                           times layers, plus the LM head (d * vocab; tied or not)
      backward, inputs   2 * N * T        the frozen weights need only the input gradient
      LoRA               6 * P * T        P = LoRA weights (A: d_in*r, B: r*d_out); fwd, input
                                           grad and weight grad
      attention         12 * B * L * S^2 * H*hd   forward QK^T and PV (4 S^2 H hd per layer and
                                           sequence, full square, no causal halving), backward 2x

    Not counted: norms, rotary, softmax, SiLU, the loss, the optimizer (all O(T * d) or O(P)).
    """
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q_out = cfg.num_attention_heads * hd
    kv_out = cfg.num_key_value_heads * hd
    ff = cfg.intermediate_size
    n = L * (d * q_out + 2 * d * kv_out + q_out * d + 3 * d * ff) + d * V
    p = n_targets_q * r * (d + q_out) + n_targets_v * r * (d + kv_out)
    t = batch * seq
    attn = 12 * batch * L * seq * seq * q_out
    return 2 * n * t + 2 * n * t + 6 * p * t + attn


def load_rows(path, tok, max_len):
    """Rows of exactly max_len ids, packed as `kaizen train --pack` packs {"text"} lines."""
    eos = tok.eos_token_id
    stream, cut = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{lineno}: expected a JSON object with a \"text\" string ({e})")
            ids = tok(text)["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            cut += len(ids) > max_len
            stream.extend(ids[:max_len])
    if cut:
        print(f"warning: {path}: {cut} line(s) longer than {max_len} tokens were cut on the right", file=sys.stderr)
    n = len(stream) // max_len
    return [stream[i * max_len : (i + 1) * max_len] for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True, help='JSONL of {"text": ...} lines')
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=256, help="tokens per packed row")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=7, help="optimizer steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--target-modules", default="q_proj,v_proj")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    args = ap.parse_args()
    if args.steps <= args.warmup or args.warmup < 0:
        ap.error("--steps must exceed --warmup (at least one timed step)")
    if min(args.max_len, args.batch_size, args.r, args.threads) < 1:
        ap.error("--max-len, --batch-size, --r and --threads must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    d, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    rows = load_rows(args.data, tok, args.max_len)
    need = args.steps * args.batch_size
    if len(rows) < need:
        sys.exit(f"{args.data}: {len(rows)} rows of {args.max_len} tokens, need {need} "
                 f"({args.steps} steps x batch {args.batch_size}); give more text")
    data = torch.tensor(rows[:need], dtype=torch.long).view(args.steps, args.batch_size, args.max_len)

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=DTYPES[args.dtype])
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    lcfg = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    times, losses, norms = [], [], []
    for step in range(args.steps):
        x = data[step]
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        norms.append(norm.item())
        if not args.json:
            print(f"step {step + 1}: loss {losses[-1]:.6f}  grad_norm {norms[-1]:.4f}  {times[-1]:.3f} s",
                  file=sys.stderr, flush=True)

    cfg = model.get_base_model().config
    n_layers_q = cfg.num_hidden_layers if "q_proj" in targets else 0
    n_layers_v = cfg.num_hidden_layers if "v_proj" in targets else 0
    if set(targets) - {"q_proj", "v_proj"}:
        print("warning: gflop_per_step counts LoRA on q_proj/v_proj only", file=sys.stderr)
    flops = flops_per_step(cfg, args.batch_size, args.max_len, args.r, n_layers_q, n_layers_v)
    s_step = statistics.median(times[args.warmup:])
    positions = args.batch_size * args.max_len
    result = {
        "impl": "pytorch",
        "dtype": args.dtype,
        "s_step": round(s_step, 4),
        "tokens_per_sec": round(positions / s_step, 2),
        "gflop_per_step": round(flops / 1e9, 2),
        "gflops": round(flops / 1e9 / s_step, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "losses": [round(v, 6) for v in losses],
        "step_seconds": [round(v, 4) for v in times],
        "grad_norms": [round(v, 4) for v in norms],
        "load_peak_rss_mb": round(load_rss, 1),
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "trainable_params": n_trainable,
        "adapter_dtype": ",".join(adapter_dtypes),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "peft": importlib.metadata.version("peft"),
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
