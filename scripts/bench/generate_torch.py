#!/usr/bin/env python3
"""PyTorch baseline for `kaizen generate` speed: greedy decoding of SmolLM2 at batch 1.

    python scripts/bench/generate_torch.py --gguf cache/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt "Write a haiku about autumn." --max-new-tokens 64 --dtype f32 --threads 2 --json

The model is loaded with transformers straight from the GGUF (every tensor dequantized to f32, then
cast to --dtype); loading is not timed. The prompt is wrapped in the GGUF's chat template
([{"role": "user", "content": PROMPT}], add_generation_prompt=True). Generation is HF `generate`,
do_sample=False, with min_new_tokens = max_new_tokens so that EOS never ends it early (this masks
EOS, so the text after a natural EOS is not what an unconstrained run would produce; only the
speed matters here). One warm-up generate runs first, then --runs timed ones; the reported
seconds is the median of those, covering prefill + all decode steps (KV cache on).

--json prints exactly one JSON line on stdout:
  {"impl": "pytorch", "dtype", "new_tokens", "seconds", "tokens_per_sec", "prefill_tokens",
   "peak_rss_mb", ...extra keys: variant ("base"), load_peak_rss_mb, prefill_seconds, decode_tokens_per_sec, runs, threads, versions}
tokens_per_sec = new_tokens / seconds (end to end, prefill included);
decode_tokens_per_sec = (new_tokens - 1) / (seconds - prefill_seconds), prefill_seconds being the
median time of one separate forward over the prompt. peak_rss_mb is ru_maxrss of this process
(includes the load, where the GGUF is dequantized); load_peak_rss_mb is the same taken right after
loading. With --dtype bf16 the model is loaded in bf16 (every weight, as `dtype=torch.bfloat16`).
"""

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization progress bar

import torch  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (median reported)")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="new tokens in the warm-up run")
    ap.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    args = ap.parse_args()
    if args.max_new_tokens < 1 or args.runs < 1:
        ap.error("--max-new-tokens and --runs must be >= 1")

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    d, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=DTYPES[args.dtype])
    model.eval()
    load_s = time.perf_counter() - t0
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def gen(n):
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
            )
        return out.shape[1] - ids.shape[1]

    def prefill():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=True)

    gen(min(args.warmup_tokens, args.max_new_tokens))
    prefill()

    times, pre_times = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        prefill()
        pre_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = gen(args.max_new_tokens)
        times.append(time.perf_counter() - t)
        if n != args.max_new_tokens:
            sys.exit(f"generate produced {n} new tokens, expected {args.max_new_tokens}")

    seconds = statistics.median(times)
    prefill_s = statistics.median(pre_times)
    n = args.max_new_tokens
    decode_s = seconds - prefill_s
    result = {
        "impl": "pytorch",
        "dtype": args.dtype,
        "variant": "base",
        "new_tokens": n,
        "seconds": round(seconds, 4),
        "tokens_per_sec": round(n / seconds, 3),
        "prefill_tokens": int(ids.shape[1]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_peak_rss_mb": round(load_rss, 1),
        "prefill_seconds": round(prefill_s, 4),
        "decode_tokens_per_sec": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None,
        "runs": args.runs,
        "run_seconds": [round(x, 4) for x in times],
        "threads": torch.get_num_threads(),
        "load_seconds": round(load_s, 2),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
