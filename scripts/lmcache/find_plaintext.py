"""Counts the files under PATHs that hold any KV bytes engine_roundtrip.py made for
(--tokens, --seed): 32-byte windows of the tensors, one per chunk, as they sit
contiguously in the chunk LMCache sends (one token's 64 values of one layer).
Checks first that the windows are found in the tensors' own bytes, so a zero
means the files hold none, not that the search is broken. Prints the count."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from engine_roundtrip import CHUNK, make_inputs  # noqa: E402


def as_bytes(t):
    return bytes(t.contiguous().view(torch.uint8).numpy())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args()
    _, kv = make_inputs(args.tokens, args.seed)
    raw = as_bytes(kv[0])
    windows = [as_bytes(kv[0][0, c * CHUNK + 7, :16]) for c in range(args.tokens // CHUNK)]
    missing = [w for w in windows if w not in raw]
    if missing:
        sys.exit("self-check failed: a window is not in the tensors' bytes")
    found = 0
    for root in args.paths:
        files = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in files:
            with open(path, "rb") as fh:
                data = fh.read()
            if any(w in data for w in windows):
                print(f"plaintext KV in {path}", file=sys.stderr)
                found += 1
    print(found)


if __name__ == "__main__":
    main()
