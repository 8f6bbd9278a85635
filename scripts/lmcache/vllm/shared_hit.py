#!/usr/bin/env python3
"""The requests and checks of shared_hit.sh: two vLLM-CPU instances (A served
as qwen-a, B as qwen-b) behind `kvgate gateway`, sharing one `kvgate store`
through LMCache, under two contracts (acme, globex) the gateway authenticates
by API key and tags each request with.

  shared_hit.py before-restart --gateway URL --tokenize URL --store-admin URL
      --key-acme K --key-globex K --state FILE --log-a FILE --log-b FILE
      [--tokens N] [--startup-json JSON]
  shared_hit.py after-restart  --gateway URL ... --state FILE --log-b FILE

before-restart:
  shared     a long prompt (>= 4 full 256-token chunks) under acme to A (greedy,
             8 tokens, logprobs), then to B: B loads every full chunk from the
             store (LMCache's "Retrieved N" log lines, the store's GET hits
             equal to the chunk count) and answers with A's tokens and
             logprobs exactly;
  contracts  another prompt under acme to A, then under globex to B: B loads
             nothing and the store counts no hit; then under acme to B: it
             loads every chunk (the contract, not a broken path, kept it out);
  restart    a third prompt under acme to A, until its chunks are on disk.
  Writes everything measured to --state.
after-restart (the store and B restarted in between):
  the third prompt under acme to B: every chunk loaded from the store's disk
  tier, A's logprobs exactly. Prints one JSON object with both halves.

Exits 1 if a check fails.
"""
import argparse
import json
import os
import random
import re
import sys
import time
import urllib.request

CHUNK = 256
WORDS = (
    "store cache tenant prefix chunk block token engine router gateway kernel layer head value key "
    "request reply socket memory disk tier shard quota salt contract model prompt answer batch queue "
    "latency budget replica region zone window metric counter gauge trace span event replay index"
).split()
MODEL = {"A": "qwen-a", "B": "qwen-b"}


def http(url, body=None, key=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
        headers = resp.headers
    ctype = headers.get("Content-Type", "")
    return (json.loads(raw) if "json" in ctype else raw.decode()), headers


def metric(url, series):
    """Sum of every sample whose series (name plus labels) starts with `series`."""
    total, seen = 0.0, False
    for line in http(f"{url}/metrics")[0].splitlines():
        if line.startswith(series):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else 0.0


def store_counts(admin):
    return {
        f"{what}_{tier}": metric(admin, f'kvgate_store_{what}{{tier="{tier}"')
        for what in ("hits_total", "chunks")
        for tier in ("memory", "disk")
    }


def hits(counts):
    return counts["hits_total_memory"] + counts["hits_total_disk"]


def make_prompt(url, tokens, seed):
    """Deterministic text of just over `tokens` tokens (measured by the engine)."""
    rng = random.Random(seed)
    sentences = []
    n = 0
    while n < tokens:
        for _ in range(40):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        text = f"Document {seed}. " + " ".join(sentences)
        n = http(f"{url}/tokenize", {"model": MODEL["A"], "prompt": text})[0]["count"]
    return text


def complete(args, side, prompt, key):
    body = {"model": MODEL[side], "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    started = time.monotonic()
    out, headers = http(f"{args.gateway}/v1/completions", body, key=key)
    choice = out["choices"][0]
    return {
        "seconds": round(time.monotonic() - started, 2),
        "endpoint": headers.get("x-kvgate-endpoint"),
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "tokens": choice["logprobs"]["tokens"],
        "logprobs": choice["logprobs"]["token_logprobs"],
    }


class LogTail:
    """What LMCache logged in one instance's log since the last mark."""

    RETRIEVED = re.compile(r"Retrieved (\d+) out of (\d+) required tokens")
    STORED = re.compile(r"Stored (\d+) out of total (\d+) tokens")

    def __init__(self, path):
        self.path = path
        self.offset = 0

    def mark(self):
        self.offset = os.path.getsize(self.path)

    def read(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        return {
            "retrieved_tokens": sum(int(m.group(1)) for m in self.RETRIEVED.finditer(text)),
            "stored_tokens": sum(int(m.group(1)) for m in self.STORED.finditer(text)),
            "shim_errors": text.count("kvgate shim:"),
        }


def wait_chunks(admin, tier, want, timeout=60.0):
    """PUTs are fire-and-forget: wait until the store holds `want` chunks in `tier`."""
    deadline = time.monotonic() + timeout
    while True:
        held = store_counts(admin)[f"chunks_{tier}"]
        if held >= want or time.monotonic() > deadline:
            return held
        time.sleep(0.25)


def same(a, b):
    diff = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)
    return {
        "tokens_identical": a["tokens"] == b["tokens"],
        "logprobs_identical": a["logprobs"] == b["logprobs"],
        "max_abs_logprob_diff": diff,
    }


def on_a(args, log_a, prompt, key):
    """A computes the prompt; waits until the store holds its full chunks."""
    before = store_counts(args.store_admin)
    log_a.mark()
    r = {"A": complete(args, "A", prompt, key)}
    r["full_chunks"] = r["A"]["prompt_tokens"] // CHUNK
    r["store_disk_chunks_after_A"] = wait_chunks(
        args.store_admin, "disk", before["chunks_disk"] + r["full_chunks"]
    )
    r["store_disk_chunks_added"] = r["store_disk_chunks_after_A"] - before["chunks_disk"]
    time.sleep(0.5)
    r["A_lmcache"] = log_a.read()
    return r


def on_b(args, log_b, prompt, key, label="B"):
    """B asks for the prompt; what it loaded and what the store served."""
    before = store_counts(args.store_admin)
    log_b.mark()
    r = {label: complete(args, "B", prompt, key)}
    time.sleep(0.5)
    after = store_counts(args.store_admin)
    r[f"{label}_lmcache"] = log_b.read()
    r[f"{label}_store_hits"] = hits(after) - hits(before)
    r[f"{label}_store_disk_hits"] = after["hits_total_disk"] - before["hits_total_disk"]
    return r


def check_endpoints(args, r, failures, where):
    for side in ("A", "B", "B_acme", "B_globex"):
        if side in r:
            want = args.endpoint_b if side.startswith("B") else args.tokenize
            if r[side]["endpoint"] != want:
                failures.append(f"{where}: {side} was served by {r[side]['endpoint']}, not {want}")


def check_loaded(r, label, failures, where):
    """B loaded every full chunk, the store served each, and A's answer came back."""
    want = r["full_chunks"] * CHUNK
    loaded = r[f"{label}_lmcache"]["retrieved_tokens"]
    served = r[f"{label}_store_hits"]
    if loaded != want or served != r["full_chunks"]:
        failures.append(f"{where}: {label} loaded {loaded} tokens (want {want}), store GET hits {served}"
                        f" (want {r['full_chunks']})")
    cmp = same(r["A"], r[label])
    r[f"compare_A_{label}"] = cmp
    if not (cmp["tokens_identical"] and cmp["logprobs_identical"]):
        failures.append(f"{where}: A's and {label}'s greedy tokens/logprobs differ")


def before_restart(args):
    log_a, log_b = LogTail(args.log_a), LogTail(args.log_b)
    out = {"startup": json.loads(args.startup_json), "failures": []}
    failures = out["failures"]

    # shared: A computes under acme, B loads under acme.
    prompt = make_prompt(args.tokenize, args.tokens, seed=1)
    r = on_a(args, log_a, prompt, args.key_acme)
    r.update(on_b(args, log_b, prompt, args.key_acme))
    if r["full_chunks"] < 4:
        failures.append(f"shared: the prompt has only {r['full_chunks']} full chunks")
    if r["store_disk_chunks_added"] < r["full_chunks"]:
        failures.append("shared: the store does not hold A's chunks")
    check_loaded(r, "B", failures, "shared")
    check_endpoints(args, r, failures, "shared")
    out["shared"] = r

    # contracts: A computes under acme; B under globex loads nothing, under acme all of it.
    prompt = make_prompt(args.tokenize, args.tokens, seed=2)
    c = on_a(args, log_a, prompt, args.key_acme)
    c.update(on_b(args, log_b, prompt, args.key_globex, label="B_globex"))
    if c["B_globex_lmcache"]["retrieved_tokens"] != 0 or c["B_globex_store_hits"] != 0:
        failures.append(f"contracts: B under globex loaded {c['B_globex_lmcache']['retrieved_tokens']}"
                        f" tokens, store hits +{c['B_globex_store_hits']}")
    c.update(on_b(args, log_b, prompt, args.key_acme, label="B_acme"))
    check_loaded(c, "B_acme", failures, "contracts")
    check_endpoints(args, c, failures, "contracts")
    out["contracts"] = c

    # restart, first half: A computes under acme, its chunks sealed to disk.
    prompt = make_prompt(args.tokenize, args.tokens, seed=3)
    s = on_a(args, log_a, prompt, args.key_acme)
    if s["store_disk_chunks_added"] < s["full_chunks"]:
        failures.append("restart: A's chunks did not reach the disk tier")
    out["restart"] = s
    out["restart_prompt_seed"] = 3
    with open(args.state, "w") as f:
        json.dump(out, f, indent=1)
    return not failures


def after_restart(args):
    with open(args.state) as f:
        out = json.load(f)
    failures = out["failures"]
    s = out["restart"]
    prompt = make_prompt(args.tokenize, args.tokens, seed=out["restart_prompt_seed"])
    log_b = LogTail(args.log_b)
    s.update(on_b(args, log_b, prompt, args.key_acme))
    check_loaded(s, "B", failures, "restart")
    if s["B_store_disk_hits"] != s["full_chunks"]:
        failures.append(f"restart: {s['B_store_disk_hits']} of B's hits came from disk (want {s['full_chunks']})")
    check_endpoints(args, s, failures, "restart")
    out["ok"] = not failures
    print(json.dumps(out, indent=1))
    return out["ok"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["before-restart", "after-restart"])
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--tokenize", required=True, help="instance A's own URL (tokenize; its endpoint name)")
    ap.add_argument("--endpoint-b", required=True, help="instance B's URL (its endpoint name)")
    ap.add_argument("--store-admin", required=True)
    ap.add_argument("--key-acme", required=True)
    ap.add_argument("--key-globex", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--log-a")
    ap.add_argument("--log-b", required=True)
    ap.add_argument("--tokens", type=int, default=1400)
    ap.add_argument("--startup-json", default="{}")
    args = ap.parse_args()
    ok = before_restart(args) if args.phase == "before-restart" else after_restart(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
