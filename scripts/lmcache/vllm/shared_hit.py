#!/usr/bin/env python3
"""The requests and checks of shared_hit.sh, against two running vLLM-CPU
instances (A, B) that share one `kvgate store` through LMCache.

  shared_hit.py --a URL --b URL --store-admin URL --log-a FILE --log-b FILE
                --model NAME [--tokens N] [--tags] [--startup-json JSON]

Phase `shared`: one long prompt (>= 4 full 256-token chunks) to A, greedy,
8 tokens, logprobs; wait until the store holds A's chunks; the same prompt to
B. B must load from the store (LMCache's "Retrieved N" log lines, vLLM's
external prefix-cache counter, the store's memory hits) and produce A's tokens
and logprobs exactly.

Phase `tags` (--tags): another prompt to A tagged `lmcache.tag.cachesalt=X`,
then to B tagged Y: B must find nothing (store hits unchanged, 0 retrieved).
Then B's own prefix cache is reset and the prompt sent to B tagged X: now it
must hit (the tag, not a broken path, kept it out).

Prints one JSON object on stdout; exits 1 if a check fails.
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


def http(url, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    ctype = resp.headers.get("Content-Type", "")
    return json.loads(raw) if "json" in ctype else raw.decode()


def metrics(url, prefix):
    """Sum of every sample whose series (name plus labels) starts with prefix."""
    total, seen = 0.0, False
    for line in http(f"{url}/metrics").splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def store_counts(admin):
    return {
        "hits": metrics(admin, 'kvgate_store_hits_total{tier="memory"'),
        "misses": metrics(admin, 'kvgate_store_misses_total{tier="memory"'),
        "chunks": metrics(admin, 'kvgate_store_chunks{tier="memory"'),
    }


def make_prompt(url, model, tokens, seed):
    """Deterministic text of just over `tokens` tokens (measured by the server)."""
    rng = random.Random(seed)
    sentences = []
    n = 0
    while n < tokens:
        for _ in range(40):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        text = f"Document {seed}. " + " ".join(sentences)
        n = http(f"{url}/tokenize", {"model": model, "prompt": text})["count"]
    return text, n


def complete(url, model, prompt, tag=None):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    if tag is not None:
        body["kv_transfer_params"] = {"lmcache.tag.cachesalt": tag}
    started = time.monotonic()
    out = http(f"{url}/v1/completions", body)
    choice = out["choices"][0]
    return {
        "seconds": round(time.monotonic() - started, 2),
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "text": choice["text"],
        "tokens": choice["logprobs"]["tokens"],
        "logprobs": choice["logprobs"]["token_logprobs"],
    }


class LogTail:
    """What LMCache logged in one instance's log since the last mark."""

    RETRIEVED = re.compile(r"Retrieved (\d+) out of (\d+) required tokens")
    HIT = re.compile(r"LMCache hit tokens: (\d+)")
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
            "lookup_hit_tokens": [int(m.group(1)) for m in self.HIT.finditer(text)],
            "stored_tokens": sum(int(m.group(1)) for m in self.STORED.finditer(text)),
            "shim_errors": text.count("kvgate shim:"),
        }


def wait_chunks(admin, want, timeout=60.0):
    """PUTs are fire-and-forget: wait until the store holds `want` chunks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = store_counts(admin)["chunks"] or 0
        if held >= want:
            return held
        time.sleep(0.25)
    return store_counts(admin)["chunks"] or 0


def external_hits(url):
    return metrics(url, "vllm:external_prefix_cache_hits")


def same(a, b):
    diff = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)
    return {
        "tokens_identical": a["tokens"] == b["tokens"],
        "logprobs_identical": a["logprobs"] == b["logprobs"],
        "max_abs_logprob_diff": diff,
    }


def one(args, logs, prompt, url_b, tag_a, tag_b, chunks_before):
    """A, wait for its chunks in the store, then B; the numbers of one pair."""
    log_a, log_b = logs
    r = {}
    log_a.mark()
    r["A"] = complete(args.a, args.model, prompt, tag_a)
    full = r["A"]["prompt_tokens"] // CHUNK
    r["store_chunks_after_A"] = wait_chunks(args.store_admin, chunks_before + full)
    time.sleep(0.5)
    r["A_lmcache"] = log_a.read()
    r["store_before_B"] = store_counts(args.store_admin)
    ext_before = external_hits(url_b)
    log_b.mark()
    r["B"] = complete(url_b, args.model, prompt, tag_b)
    time.sleep(0.5)
    r["B_lmcache"] = log_b.read()
    r["store_after_B"] = store_counts(args.store_admin)
    ext_after = external_hits(url_b)
    r["B_vllm_external_prefix_cache_hits"] = (
        None if ext_after is None else ext_after - (ext_before or 0)
    )
    r["store_memory_hits_delta"] = (r["store_after_B"]["hits"] or 0) - (r["store_before_B"]["hits"] or 0)
    r["full_chunks"] = full
    r["compare"] = same(r["A"], r["B"])
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--store-admin", required=True)
    ap.add_argument("--log-a", required=True)
    ap.add_argument("--log-b", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=1400)
    ap.add_argument("--tags", action="store_true")
    ap.add_argument("--startup-json", default="{}")
    args = ap.parse_args()
    logs = (LogTail(args.log_a), LogTail(args.log_b))
    out = {"startup": json.loads(args.startup_json)}
    failures = []

    # Phase 1: the shared namespace.
    prompt, n = make_prompt(args.a, args.model, args.tokens, seed=1)
    before = store_counts(args.store_admin)
    out["store_before"] = before
    p = one(args, logs, prompt, args.b, None, None, before["chunks"] or 0)
    out["shared"] = p
    loaded = p["B_lmcache"]["retrieved_tokens"]
    want = p["full_chunks"] * CHUNK
    if p["full_chunks"] < 4:
        failures.append(f"prompt has only {p['full_chunks']} full chunks")
    if p["store_chunks_after_A"] - (before["chunks"] or 0) < p["full_chunks"]:
        failures.append("the store does not hold A's chunks")
    if loaded < want or p["store_memory_hits_delta"] <= 0:
        failures.append(f"B loaded {loaded} tokens (want {want}), store hits +{p['store_memory_hits_delta']}")
    if not (p["compare"]["tokens_identical"] and p["compare"]["logprobs_identical"]):
        failures.append("A's and B's greedy tokens/logprobs differ")

    # Phase 2: different tags, no hit; the same tag, a hit.
    if args.tags:
        prompt2, _ = make_prompt(args.a, args.model, args.tokens, seed=2)
        chunks = store_counts(args.store_admin)["chunks"] or 0
        t = one(args, logs, prompt2, args.b, "tenant-x", "tenant-y", chunks)
        out["tags_differ"] = t
        if t["B_lmcache"]["retrieved_tokens"] != 0 or t["store_memory_hits_delta"] != 0:
            failures.append(
                f"B with another tag loaded {t['B_lmcache']['retrieved_tokens']} tokens,"
                f" store hits +{t['store_memory_hits_delta']}"
            )
        # Positive control: B forgets its own prefix cache, then asks with A's tag.
        http(f"{args.b}/reset_prefix_cache", {})
        time.sleep(0.5)
        s_before = store_counts(args.store_admin)
        logs[1].mark()
        c = complete(args.b, args.model, prompt2, "tenant-x")
        time.sleep(0.5)
        s_after = store_counts(args.store_admin)
        ctl = {
            "B": c,
            "B_lmcache": logs[1].read(),
            "store_memory_hits_delta": (s_after["hits"] or 0) - (s_before["hits"] or 0),
            "compare_with_A": same(t["A"], c),
        }
        out["tags_same"] = ctl
        if ctl["B_lmcache"]["retrieved_tokens"] < t["full_chunks"] * CHUNK or ctl["store_memory_hits_delta"] <= 0:
            failures.append("B with A's tag did not load from the store")
        if not ctl["compare_with_A"]["logprobs_identical"]:
            failures.append("B with A's tag: logprobs differ from A's")

    out["ok"] = not failures
    out["failures"] = failures
    for phase in ("shared", "tags_differ"):
        for side in ("A", "B"):
            if phase in out:
                out[phase][side].pop("text", None)
    print(json.dumps(out, indent=1))
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
