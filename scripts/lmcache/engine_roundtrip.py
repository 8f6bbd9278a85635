#!/usr/bin/env python3
"""One side of a two-process round trip through LMCache's own engine and `lm://` connector.

  engine_roundtrip.py --url lm://HOST:PORT --role store|retrieve --tokens N --seed S [--tag VALUE]

`store` makes deterministic KV for N tokens and stores it through LMCache to the
remote server; `retrieve` (a fresh process, empty local CPU tier) looks the same
tokens up, retrieves them and compares bit-exact. Prints one JSON line on stdout
(LMCache logs go to stderr); exits 1 on any mismatch or shortfall.

Runs on CPU: LMCache ships no CPU copy kernel, so `TorchCopyConnector` below
stands in for its GPU connector with plain torch copies. Both processes need the
same PYTHONHASHSEED, since LMCache's default chunk hash is Python's hash().
"""
import argparse
import json
import os
import sys
import time

import torch

from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata

# The tiny test model: 2 layers, 2 kv heads, head_dim 32, bf16 (131,072 B per chunk).
MODEL, LAYERS, KV_HEADS, HEAD_DIM, DTYPE, CHUNK = "/models/tiny-qwen", 2, 2, 32, torch.bfloat16, 256
HIDDEN = KV_HEADS * HEAD_DIM


class TorchCopyConnector(GPUConnectorInterface):
    """Copies between our KV layout (one [2, tokens, hidden] tensor per layer, passed
    as kwargs["kvcaches"]) and LMCache's KV_2LTD memory objects [2, layers, tokens, hidden]."""

    def get_shape(self, num_tokens):
        return torch.Size([2, LAYERS, num_tokens, HIDDEN])

    def from_gpu(self, memory_obj, start, end, **kwargs):
        for layer, kv in enumerate(kwargs["kvcaches"]):
            memory_obj.tensor[:, layer].copy_(kv[:, start:end])

    def to_gpu(self, memory_obj, start, end, **kwargs):
        for layer, kv in enumerate(kwargs["kvcaches"]):
            kv[:, start:end].copy_(memory_obj.tensor[:, layer])

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        for obj, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(obj, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs=None, starts=None, ends=None, **kwargs):
        for obj, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(obj, s, e, **kwargs)


def make_inputs(tokens, seed):
    """Same token ids and KV in every process for the same (tokens, seed)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (tokens,), generator=gen, dtype=torch.long)
    kv = [torch.randn(2, tokens, HIDDEN, generator=gen).to(DTYPE) for _ in range(LAYERS)]
    return ids, kv


def build_engine(url):
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.5,
        remote_url=url, remote_serde="naive", save_unfull_chunk=False,
    )
    metadata = LMCacheMetadata(
        model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=DTYPE, kv_shape=(LAYERS, 2, CHUNK, KV_HEADS, HEAD_DIM), chunk_size=CHUNK,
    )
    engine = LMCacheEngineBuilder.get_or_create(
        "kvgate-e2e", config, metadata, TorchCopyConnector(), None, None
    )
    engine.post_init()  # creates the storage manager (and the remote connection)
    return engine


def wait_for_puts(engine, timeout=30.0):
    """PUTs are fire-and-forget on an event loop thread: wait until none is pending."""
    remote = engine.storage_manager.storage_backends.get("RemoteBackend")
    deadline = time.monotonic() + timeout
    while remote is not None and remote.put_tasks and time.monotonic() < deadline:
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--role", choices=["store", "retrieve"], required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", help="cache salt, sent the way vLLM's connector sends lmcache.tag.cachesalt")
    args = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") is None:
        sys.exit("set PYTHONHASHSEED (the same in both processes): LMCache hashes chunks with hash()")

    # vLLM's connector forwards kv_transfer_params' lmcache.* entries as request_configs;
    # lmcache.tag.* entries become `@name%value` suffixes on every chunk key.
    request_configs = {"lmcache.tag.cachesalt": args.tag} if args.tag else None
    ids, kv = make_inputs(args.tokens, args.seed)
    expected = args.tokens // CHUNK * CHUNK  # full chunks only (save_unfull_chunk: false)
    engine = build_engine(args.url)
    out = {"role": args.role, "tokens": args.tokens}
    # The key of the first chunk as the connector sends it (shows where the tag lands).
    first = next(iter(engine.token_database.process_tokens(ids, request_configs=request_configs)), None)
    out["first_key"] = first[2].to_string() if first else None
    try:
        if args.role == "store":
            engine.store(ids, kvcaches=kv, request_configs=request_configs)
            wait_for_puts(engine)
            # EXIST round trips on the same connection: the server really holds them.
            remote_hit = engine.lookup(ids, search_range=["RemoteBackend"], request_configs=request_configs)
            out["chunks_stored"] = remote_hit // CHUNK
            ok = remote_hit == expected
        else:
            hit = engine.lookup(ids, request_configs=request_configs)
            got = [torch.zeros_like(t) for t in kv]
            mask = engine.retrieve(ids, kvcaches=got, request_configs=request_configs, req_id="e2e")
            n = int(mask.sum())
            out["lookup_tokens"] = hit
            out["tokens_retrieved"] = n
            ok = hit == expected and n == expected and bool(mask[:n].all())
            ok = ok and all(torch.equal(g[:, :n], w[:, :n]) for g, w in zip(got, kv))
        out["bit_exact"] = bool(ok)  # store: every full chunk is on the server
    finally:
        LMCacheEngineBuilder.destroy("kvgate-e2e")
    print(json.dumps(out), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
