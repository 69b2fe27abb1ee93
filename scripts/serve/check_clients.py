"""The official `openai` client against a running `kaizen serve` (BASE, KEY in the environment):
chat and completions, streaming and not, for the base model and every adapter; each greedy answer
must equal `kaizen generate --greedy` (K, MODEL, WORK) for the same model, adapter and prompt."""
import json, os, subprocess, sys

import openai

base, key, k, model, work = (os.environ[v] for v in ("BASE", "KEY", "K", "MODEL", "WORK"))
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
failed = 0


def check(what, ok, detail=""):
    global failed
    print(("ok   " if ok else "FAIL ") + what + (f"\n  {detail}" if detail else ""))
    failed += not ok


def generate(adapter, prompt, n, chat):
    cmd = [k, "generate", "--model", model, "--prompt", prompt, "--greedy", "--json", "--max-new-tokens", str(n)]
    if adapter:
        cmd += ["--adapter", os.path.join(work, adapter)]
    if chat:
        cmd += ["--chat"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["text"]


names = [m.id for m in client.models.list().data]
check(f"models.list(): {names}", names[0] == "smollm2" and len(names) == 5)
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    check("a wrong key is refused", False)
except openai.AuthenticationError as e:
    check(f"a wrong key: AuthenticationError {e.status_code}", e.status_code == 401)
try:
    client.completions.create(model="nope", prompt="a", max_tokens=2)
    check("an unknown model is refused", False)
except openai.NotFoundError as e:
    check(f"an unknown model: NotFoundError {e.status_code}", e.status_code == 404)

question = "What color is the leaf? Answer in one word."
for name in names:
    adapter = None if name == "smollm2" else name
    want_chat = generate(adapter, question, 24, True)
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                       max_tokens=24, temperature=0)
    got = r.choices[0].message.content
    check(f"chat {name}: {got!r} (finish {r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens)"
          + (" == kaizen generate --chat" if got == want_chat else ""), got == want_chat,
          "" if got == want_chat else f"kaizen generate: {want_chat!r}")
    parts = []
    for chunk in client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                max_tokens=24, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    check(f"chat stream {name}: {len(parts)} chunks, same text", "".join(parts) == want_chat)
    prompt = "The three primary colors are"
    want = generate(adapter, prompt, 16, False)
    r = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    got = r.choices[0].text
    check(f"completion {name}: {got!r}" + (" == kaizen generate" if got == want else ""), got == want,
          "" if got == want else f"kaizen generate: {want!r}")
    lp = r.choices[0].logprobs
    check(f"  logprobs: {len(lp.tokens)} tokens (= completion_tokens), top 2 each",
          len(lp.tokens) == r.usage.completion_tokens and all(len(t) == 2 for t in lp.top_logprobs))
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=name, prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices)
    check(f"completion stream {name}: same text", text == want)

r = client.completions.create(model="lora-all", prompt="Add 4 and 5.", max_tokens=12, temperature=0.8, top_p=0.9,
                              seed=3, n=3, stop=["\n\n"])
again = client.completions.create(model="lora-all", prompt="Add 4 and 5.", max_tokens=12, temperature=0.8,
                                  top_p=0.9, seed=3, n=3, stop=["\n\n"])
check(f"sampled n=3 with a seed: {[c.text for c in r.choices]}, reproducible",
      [c.text for c in r.choices] == [c.text for c in again.choices] and all("\n\n" not in c.text for c in r.choices))
sys.exit(1 if failed else 0)
