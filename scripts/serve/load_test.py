"""Load test of a running `kaizen serve` (standard library only; loopback; bounded).

1. Alone: each of the 32 requests on its own, one at a time (greedy, fixed length): the
   reference answers, and one-at-a-time tokens/s.
2. Rounds: 32 concurrent streaming clients over the base model and 4 adapters, 3 times; every
   answer must equal its alone answer, no request may fail; the server's RSS after each round.
3. Scaling: 8 concurrent requests (over the 4 adapters and the base) against the same 8 run
   one at a time: aggregate decode tokens/s, end to end and inside the engine (/metrics).

With --llamacpp, only step 3 against llama.cpp's llama-server (base model only, as it serves
no adapters here; end to end only, its metrics count overlapping slots' time).
"""
import argparse, http.client, json, sys, threading, time
from urllib.parse import urlparse

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--pid", type=int, required=True)
p.add_argument("--clients", type=int, default=32)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--tokens", type=int, default=48)
p.add_argument("--scaling", type=int, default=8)
p.add_argument("--llamacpp", metavar="LABEL", help="a llama-server: only the scaling step, base model")
args = p.parse_args()
url = urlparse(args.base)
MODELS = ["smollm2"] if args.llamacpp else ["smollm2", "lora-qv", "lora-all", "ia3", "prefix"]
TOPICS = ["the sea", "a small town", "winter", "a robot", "the moon", "bread", "a library", "rain"]


def request(i):
    return {"model": MODELS[i % len(MODELS)],
            "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]} (story {i})."}],
            "max_tokens": args.tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def run(body):
    """Streams one chat completion; returns (text, tokens, seconds, error)."""
    t0 = time.time()
    try:
        c = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return None, 0, time.time() - t0, f"HTTP {r.status}: {r.read()[:200]!r}"
        text, tokens, chunks, done = [], 0, 0, False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                return None, 0, time.time() - t0, f"stream error: {ev['error']}"
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                text.append(ev["choices"][0]["delta"]["content"])
                chunks += 1
        c.close()
        if not done:
            return None, 0, time.time() - t0, "stream ended without [DONE]"
        return "".join(text), tokens or chunks, time.time() - t0, None
    except Exception as e:  # noqa: BLE001 - report any failure as the request's error
        return None, 0, time.time() - t0, repr(e)


def concurrently(bodies):
    out = [None] * len(bodies)

    def worker(i):
        out[i] = run(bodies[i])

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out, time.time() - t0


def metrics():
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    c.request("GET", "/metrics")
    m = {}
    for line in c.getresponse().read().decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, v = line.split()
            m[k] = float(v)
    return m


def rss_mb():
    with open(f"/proc/{args.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def engine_rate(before, after):
    rows = after["kaizen_decode_rows_total"] - before["kaizen_decode_rows_total"]
    secs = after["kaizen_decode_seconds_total"] - before["kaizen_decode_seconds_total"]
    steps = after["kaizen_decode_steps_total"] - before["kaizen_decode_steps_total"]
    return rows / secs, rows / max(steps, 1)


errors = 0
if not args.llamacpp:
    bodies = [request(i) for i in range(args.clients)]
    print(f"{args.clients} chat requests over {MODELS}, greedy, max_tokens {args.tokens}, streamed")

    # 1. Alone.
    m0 = metrics()
    alone, t0 = [], time.time()
    for b in bodies:
        alone.append(run(b))
    alone_secs = time.time() - t0
    m1 = metrics()
    bad = [r[3] for r in alone if r[3]]
    errors += len(bad)
    total = sum(r[1] for r in alone)
    rate1, _ = engine_rate(m0, m1)
    print(f"alone, one at a time: {total} tokens in {alone_secs:.1f}s, {total / alone_secs:.1f} tokens/s end to end, "
          f"{rate1:.1f} decode tokens/s in the engine; errors {len(bad)} {bad[:2]}")
    print(f"RSS after the alone pass: {rss_mb():.0f} MB")

    # 2. Rounds of 32 concurrent streaming clients.
    rss = []
    for k in range(args.rounds):
        before = metrics()
        out, secs = concurrently(bodies)
        after = metrics()
        errs = [r[3] for r in out if r[3]]
        same = sum(1 for r, a in zip(out, alone) if r[0] is not None and r[0] == a[0])
        errors += len(errs) + (args.clients - len(errs) - same)
        rate, batch = engine_rate(before, after)
        rss.append(rss_mb())
        print(f"round {k + 1}: {args.clients} concurrent streams in {secs:.1f}s, {total / secs:.1f} tokens/s end to end "
              f"({total / secs / (total / alone_secs):.2f}x alone), engine {rate:.1f} decode tokens/s at a mean batch of "
              f"{batch:.1f}; identical to alone: {same}/{args.clients}; errors {len(errs)} {errs[:2]}; RSS {rss[-1]:.0f} MB")
        for i, (r, a) in enumerate(zip(out, alone)):
            if r[0] is not None and r[0] != a[0]:
                print(f"  differs: request {i} ({bodies[i]['model']}): {r[0][:80]!r} vs alone {a[0][:80]!r}")
    print(f"RSS over rounds: {', '.join(f'{x:.0f}' for x in rss)} MB (round 3 - round 1: {rss[-1] - rss[0]:+.0f} MB)")

# 3. Scaling: 8 concurrent vs the same 8 one at a time.
n = args.scaling
few = [request(i) for i in range(n)]
metrics_or_none = (lambda: None) if args.llamacpp else metrics
b0 = metrics_or_none()
t0 = time.time()
seq = [run(b) for b in few]
seq_secs = time.time() - t0
b1 = metrics_or_none()
par, par_secs = concurrently(few)
b2 = metrics_or_none()
bad = [r[3] for r in seq + par if r[3]]
errors += len(bad)
tok, par_tok = sum(r[1] for r in seq), sum(r[1] for r in par)
same = f"identical: {sum(1 for a, b in zip(seq, par) if a[0] == b[0])}/{n}"
if args.llamacpp:
    print(f"{args.llamacpp}: scaling, {n} requests: one at a time {seq_secs:.1f}s ({tok} tokens, {tok / seq_secs:.1f} "
          f"tokens/s end to end); {n} concurrent {par_secs:.1f}s ({par_tok} tokens, {par_tok / par_secs:.1f} tokens/s "
          f"end to end); errors {len(bad)} {bad[:2]}")
    print(f"{args.llamacpp}: SPEEDUP at {n} concurrent: {(par_tok / par_secs) / (tok / seq_secs):.2f}x end to end; {same}")
else:
    seq_rate, _ = engine_rate(b0, b1)
    par_rate, par_batch = engine_rate(b1, b2)
    print(f"scaling, {n} requests: one at a time {seq_secs:.1f}s ({tok / seq_secs:.1f} tokens/s end to end, engine "
          f"{seq_rate:.1f} decode tokens/s); {n} concurrent {par_secs:.1f}s ({tok / par_secs:.1f} tokens/s end to end, "
          f"engine {par_rate:.1f} decode tokens/s at a mean batch of {par_batch:.1f})")
    print(f"SPEEDUP at {n} concurrent: {seq_secs / par_secs:.2f}x end to end, {par_rate / seq_rate:.2f}x engine decode "
          f"tokens/s; {same}")
print(f"errors in total: {errors}")
sys.exit(1 if errors else 0)
