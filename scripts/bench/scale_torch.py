#!/usr/bin/env python3
"""PyTorch + PEFT side of the scale benchmark (scripts/bench/scale.sh): LoRA training steps on a
large model directory (scripts/bench/make_scale_model.py) on the CPU.

    python scripts/bench/scale_torch.py --model cache/scale/rinna36 --mode bf16 \
        --data DIR/data.jsonl --batch-size 1 --max-len 128 --steps 4 --warmup 1 --threads 2

Modes (how the frozen base is held; LoRA and AdamW state are f32 in all three):
  f32   from_pretrained(dtype=float32): the bf16 checkpoint widened to f32.
  bf16  from_pretrained(dtype=bfloat16); PEFT's default autocast_adapter_dtype=True keeps the
        adapter f32 (the LoRA branch casts its input to f32).
  bnb4  from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bfloat16), dtype=bfloat16,
        device_map="cpu"): every nn.Linear but the LM head becomes a bitsandbytes Linear4bit
        (NF4, one f32 absmax per 64 weights; transformers skips lm_head/embed_out), the rest
        bf16. No prepare_model_for_kbit_training (it would widen embeddings and head to f32 and
        turn on gradient checkpointing; neither side checkpoints here).

LoRA (PEFT): r --r (8), lora_alpha --lora-alpha (16), dropout 0, bias none, on the attention
projections: GPT-NeoX query_key_value, Llama q_proj,k_proj,v_proj,o_proj (--target-modules
overrides). AdamW lr --lr, betas 0.9/0.999, eps 1e-8, weight decay 0; clip_grad_norm_ 1.0.

Data: with --data, a JSONL of {"text"} lines packed exactly as `kaizen train --pack --max-len T
--no-shuffle` packs it (train_torch.load_rows: the model directory's tokenizer, EOS appended,
lines concatenated in file order, rows of exactly T ids), so both sides see the same rows and the
first-step losses (LoRA B = 0) agree. Without --data, rows come from a seeded stream of uniform ids
below the tokenizer's size (--seed).

Each step: forward with labels (input_ids = labels; the model shifts), backward, clip, AdamW step,
zero_grad; timed from batch to updated weights. Loading is not timed.

Output, one JSON object a line on stdout (progress on stderr):
  {"event": "load", "seconds", "load_peak_rss_mb", "trainable_params", ...}
  {"step": k, "loss": x, "seconds": s}                      one per step
  {"impl": "pytorch", "mode", "s_step", "tokens_per_sec", "peak_rss_mb", "losses", "step_seconds",
   ...}                                                      the summary, always the last line
s_step = median of the step times after the first --warmup; tokens_per_sec = B * T / s_step;
peak_rss_mb = ru_maxrss of this process (load included, MiB).
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

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_torch import load_rows  # noqa: E402

DEFAULT_TARGETS = {"gpt_neox": "query_key_value", "llama": "q_proj,k_proj,v_proj,o_proj"}


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--mode", choices=["f32", "bf16", "bnb4"], required=True)
    ap.add_argument("--data", help='JSONL of {"text"} lines (default: a seeded random id stream)')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=128, help="tokens per row (T)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--target-modules", help="default: the attention projections of the architecture")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    if not 0 <= a.warmup < a.steps:
        ap.error("need 0 <= --warmup < --steps")
    if min(a.max_len, a.batch_size, a.r, a.threads) < 1:
        ap.error("--max-len, --batch-size, --r and --threads must be >= 1")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cfg = AutoConfig.from_pretrained(a.model)
    targets = a.target_modules or DEFAULT_TARGETS.get(cfg.model_type)
    if not targets:
        sys.exit(f"scale_torch: no default target modules for model_type {cfg.model_type!r}; give --target-modules")
    targets = [m.strip() for m in targets.split(",") if m.strip()]

    tok = AutoTokenizer.from_pretrained(a.model)
    need = a.steps * a.batch_size
    if a.data:
        rows = load_rows(a.data, tok, a.max_len)
        if len(rows) < need:
            sys.exit(f"scale_torch: {a.data}: {len(rows)} rows of {a.max_len} tokens, need {need}")
        data = torch.tensor(rows[:need], dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(a.seed)
        data = torch.randint(0, min(len(tok), cfg.vocab_size), (need, a.max_len), generator=g)
    data = data.view(a.steps, a.batch_size, a.max_len)

    t0 = time.perf_counter()
    kw = {}
    if a.mode == "f32":
        kw["dtype"] = torch.float32
    elif a.mode == "bf16":
        kw["dtype"] = torch.bfloat16
    else:
        from transformers import BitsAndBytesConfig

        kw["dtype"] = torch.bfloat16
        kw["device_map"] = "cpu"
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
    lcfg = LoraConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    base_linear = sorted({type(m).__module__ + "." + type(m).__name__
                          for n, m in model.named_modules() if n.endswith(targets[0] + ".base_layer")})
    emit({"event": "load", "seconds": round(load_s, 2), "load_peak_rss_mb": round(rss_mb(), 1),
          "trainable_params": n_trainable, "base_layer": ",".join(base_linear),
          "adapter_dtype": ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))})
    load_rss = rss_mb()
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    times, losses = [], []
    for step in range(a.steps):
        x = data[step]
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        emit({"step": step + 1, "loss": round(losses[-1], 6), "seconds": round(times[-1], 4)})
        print(f"scale_torch {a.mode}: step {step + 1}: loss {losses[-1]:.6f} {times[-1]:.2f} s "
              f"(peak RSS {rss_mb() / 1024:.2f} GiB)", file=sys.stderr, flush=True)

    s_step = statistics.median(times[a.warmup:])
    emit({
        "impl": "pytorch", "mode": a.mode, "s_step": round(s_step, 4),
        "tokens_per_sec": round(a.batch_size * a.max_len / s_step, 3),
        "peak_rss_mb": round(rss_mb(), 1), "load_peak_rss_mb": round(load_rss, 1),
        "load_seconds": round(load_s, 2), "losses": [round(v, 6) for v in losses],
        "step_seconds": [round(v, 4) for v in times], "steps": a.steps, "warmup": a.warmup,
        "batch_size": a.batch_size, "max_len": a.max_len, "trainable_params": n_trainable,
        "target_modules": targets, "base_layer": ",".join(base_linear), "threads": torch.get_num_threads(),
        "data": "jsonl" if a.data else "random", "model_type": cfg.model_type,
        "attn_implementation": getattr(model.get_base_model().config, "_attn_implementation", None),
        "torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
        "peft": importlib.metadata.version("peft"),
        "bitsandbytes": _version("bitsandbytes") if a.mode == "bnb4" else None,
    })


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
