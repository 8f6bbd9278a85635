#!/usr/bin/env python3
"""A fake vLLM KV-event publisher on real libzmq (pyzmq), for interop tests.

It mimics vLLM's ZmqEventPublisher framing exactly:

- PUB bound on tcp://*:PUB_PORT (a wildcard host makes vLLM bind; with
  --pub-connect it connects instead, and the subscriber binds), sending
  [topic, seq (8-byte big-endian), payload];
- ROUTER bound on tcp://*:REPLAY_PORT answering [identity, b"", start_seq]
  with [identity, b"", topic, seq, payload] per buffered seq >= start_seq,
  then the end marker [identity, b"", b"", (-1) as 8 bytes, b""].

The payloads are real engine bytes: vLLM 0.33.0 vectors from
fixtures/vllm/kv_events.json (block size 16, `--set v033`) or the capture of a
real vLLM 0.32 server in fixtures/vllm/real-vllm-0.32-events.txt (block size
32, `--set real032`), plus a few batches synthesized in the same msgspec form.

Protocol with the test (stdin/stdout, one line each):

1. Warm-up: empty batches [ts, [], 0] are published every --probe-interval
   seconds (ZMQ's slow joiner: a SUB only gets what is sent after it
   subscribed) until a line "go" arrives on stdin.
2. The main sequence is published with fresh seqs, except the batch at
   --drop-index, which only goes into the replay buffer (a lost message the
   subscriber must replay).
3. One JSON line is printed: {"true_blocks": [[hash, tier], ...],
   "last_seq": N, "dropped_seq": D} -- the block set the engine holds, with
   the index's semantics (orphans and non-full-attention groups excluded).
4. Replays are served until stdin closes or --max-runtime passes.
"""

import argparse
import json
import os
import struct
import sys
import time

try:
    import zmq
except ImportError:  # the Rust test checks this first and explains
    sys.stderr.write("pyzmq is required: pip install pyzmq\n")
    sys.exit(3)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- minimal msgpack, enough for vLLM's event batches ------------------------

def mp_encode(o, out):
    if o is None:
        out.append(0xC0)
    elif o is True or o is False:
        out.append(0xC3 if o else 0xC2)
    elif isinstance(o, int):
        if 0 <= o < 0x80:
            out.append(o)
        elif -32 <= o < 0:
            out.append(o & 0xFF)
        elif o >= 0:
            for lim, tag, fmt in ((0xFF, 0xCC, ">B"), (0xFFFF, 0xCD, ">H"),
                                  (0xFFFFFFFF, 0xCE, ">I"), (2**64 - 1, 0xCF, ">Q")):
                if o <= lim:
                    out.append(tag)
                    out += struct.pack(fmt, o)
                    break
        else:
            for lim, tag, fmt in ((-0x80, 0xD0, ">b"), (-0x8000, 0xD1, ">h"),
                                  (-0x80000000, 0xD2, ">i"), (-(2**63), 0xD3, ">q")):
                if o >= lim:
                    out.append(tag)
                    out += struct.pack(fmt, o)
                    break
    elif isinstance(o, float):
        out.append(0xCB)
        out += struct.pack(">d", o)
    elif isinstance(o, str):
        b = o.encode()
        if len(b) < 32:
            out.append(0xA0 | len(b))
        elif len(b) < 256:
            out += bytes([0xD9, len(b)])
        else:
            out.append(0xDA)
            out += struct.pack(">H", len(b))
        out += b
    elif isinstance(o, (list, tuple)):
        if len(o) < 16:
            out.append(0x90 | len(o))
        else:
            out.append(0xDC)
            out += struct.pack(">H", len(o))
        for x in o:
            mp_encode(x, out)
    elif isinstance(o, dict):
        if len(o) < 16:
            out.append(0x80 | len(o))
        else:
            out.append(0xDE)
            out += struct.pack(">H", len(o))
        for k, v in o.items():
            mp_encode(k, out)
            mp_encode(v, out)
    else:
        raise TypeError(type(o))
    return out


def mp_decode(b, i=0):
    t = b[i]
    i += 1
    if t < 0x80:
        return t, i
    if t >= 0xE0:
        return t - 0x100, i
    if 0x80 <= t <= 0x8F or t in (0xDE, 0xDF):
        if t <= 0x8F:
            n = t & 0x0F
        else:
            fmt = ">H" if t == 0xDE else ">I"
            n = struct.unpack_from(fmt, b, i)[0]
            i += struct.calcsize(fmt)
        d = {}
        for _ in range(n):
            k, i = mp_decode(b, i)
            v, i = mp_decode(b, i)
            d[k] = v
        return d, i
    if 0x90 <= t <= 0x9F or t in (0xDC, 0xDD):
        if t <= 0x9F:
            n = t & 0x0F
        else:
            fmt = ">H" if t == 0xDC else ">I"
            n = struct.unpack_from(fmt, b, i)[0]
            i += struct.calcsize(fmt)
        a = []
        for _ in range(n):
            v, i = mp_decode(b, i)
            a.append(v)
        return a, i
    if 0xA0 <= t <= 0xBF or t in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        if t <= 0xBF:
            n = t & 0x1F
        else:
            fmt = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I", 0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}[t]
            n = struct.unpack_from(fmt, b, i)[0]
            i += struct.calcsize(fmt)
        raw = bytes(b[i:i + n])
        i += n
        return (raw if t in (0xC4, 0xC5, 0xC6) else raw.decode()), i
    fixed = {0xC0: None, 0xC2: False, 0xC3: True}
    if t in fixed:
        return fixed[t], i
    fmt = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
           0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}.get(t)
    if fmt is None:
        raise ValueError("unsupported msgpack type 0x%02x" % t)
    v = struct.unpack_from(fmt, b, i)[0]
    return v, i + struct.calcsize(fmt)


def fold_hash(h):
    # vLLM publishes an int or raw digest bytes; both fold to the low 8 bytes.
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:], "big")
    return h & (2**64 - 1)


# --- the engine's true block set, with the index's semantics -----------------

class TrueSet:
    def __init__(self):
        self.held = set()  # (engine hash, tier)

    def known(self, h):
        return any(x == h for x, _ in self.held)

    def apply(self, payload):
        batch, end = mp_decode(payload)
        assert end == len(payload), "trailing bytes"
        for ev in batch[1]:
            kind = ev["type"] if isinstance(ev, dict) else ev[0]
            if not isinstance(ev, dict):
                raise ValueError("tagged-array events are not used here")
            tier = (ev.get("medium") or "GPU").upper()
            if kind == "BlockStored":
                spec = ev.get("kv_cache_spec_kind")
                if spec not in (None, "full_attention"):
                    continue  # other groups mirror the same tokens
                parent = ev.get("parent_block_hash")
                if parent is not None and not self.known(fold_hash(parent)):
                    continue  # orphan: the index cannot key it
                for h in ev["block_hashes"]:
                    self.held.add((fold_hash(h), tier))
            elif kind == "BlockRemoved":
                for h in ev["block_hashes"]:
                    self.held.discard((fold_hash(h), tier))
            elif kind == "AllBlocksCleared":
                self.held.clear()


# --- payload sets ---------------------------------------------------------------

def batch(events, dp_rank=0, ts=None):
    return bytes(mp_encode([time.time() if ts is None else ts, events, dp_rank], bytearray()))


def removed(h, medium="GPU"):
    return {"type": "BlockRemoved", "block_hashes": [h], "medium": medium, "group_idx": 0}


def stored(hashes, parent, tokens, block_size, medium="GPU"):
    # Field order and None fields as vLLM 0.32's BlockStored writes them.
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": block_size, "lora_id": None,
            "medium": medium, "lora_name": None, "group_idx": 0,
            "kv_cache_spec_kind": "full_attention"}


def v033_sequence():
    with open(os.path.join(ROOT, "fixtures/vllm/kv_events.json")) as f:
        v = json.load(f)["versions"][0]
    assert v["vllm_version"] == "0.33.0", v["vllm_version"]
    p = {x["name"]: bytes.fromhex(x["payload_hex"]) for x in v["int_block_hashes"]}
    return [
        p["prefill_3_blocks"],
        p["remove_and_clear"],      # leaves nothing: the clear resets it all
        p["lora_salt_two_events"],  # (dropped live by default: must be replayed)
        p["multimodal"],
        p["prefill_3_blocks"],
        p["dp_rank_3_offload_tier"],  # sliding-window group: not indexed
        batch([removed(382965442187400130)]),  # evict prefill's last block
        p["empty_batch_no_dp"],
    ]


def real032_sequence():
    payloads = {}
    with open(os.path.join(ROOT, "fixtures/vllm/real-vllm-0.32-events.txt")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, length, hexpayload = line.split()
            raw = bytes.fromhex(hexpayload)
            assert len(raw) == int(length), kind
            payloads[kind] = raw
    real_stored = mp_decode(payloads["BlockStored"])[0][1][0]
    parent = real_stored["parent_block_hash"]
    bs = real_stored["block_size"]
    # The capture's BlockStored chains onto a block stored before the capture:
    # announce that parent first so the real event is not an orphan.
    root = batch([stored([parent], None, list(range(1000, 1000 + bs)), bs,
                         real_stored.get("medium") or "GPU")])
    return [
        payloads["AllBlocksCleared"],
        root,
        payloads["BlockStored"],      # (dropped live by default: must be replayed)
        payloads["BlockRemoved"],     # a block this run never stored
        batch([]),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pub-port", type=int, required=True)
    ap.add_argument("--replay-port", type=int, required=True)
    ap.add_argument("--set", choices=["v033", "real032"], default="v033")
    ap.add_argument("--drop-index", type=int, default=2,
                    help="index in the main sequence of the batch not published live")
    ap.add_argument("--topic", default="")
    ap.add_argument("--pub-connect", action="store_true",
                    help="connect the PUB to 127.0.0.1:PUB_PORT, as vLLM does for an "
                         "endpoint without a wildcard host (the subscriber binds)")
    ap.add_argument("--probe-interval", type=float, default=0.05)
    ap.add_argument("--max-runtime", type=float, default=60.0)
    args = ap.parse_args()

    seqs = v033_sequence() if args.set == "v033" else real032_sequence()
    topic = args.topic.encode()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    if args.pub_connect:
        pub.connect("tcp://127.0.0.1:%d" % args.pub_port)
    else:
        pub.bind("tcp://*:%d" % args.pub_port)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://*:%d" % args.replay_port)

    buffer = []  # (seq, payload), like vLLM's bounded deque
    next_seq = 0

    def publish(payload, live=True):
        nonlocal next_seq
        seq = next_seq
        next_seq += 1
        if live:
            pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
        buffer.append((seq, payload))
        return seq

    def serve_replay():
        frames = router.recv_multipart()
        if len(frames) != 3:
            sys.stderr.write("ignoring replay request with %d frames\n" % len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in buffer:
            if seq >= start_seq:
                router.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))
        router.send_multipart((client, b"", b"", END_SEQ, b""))

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    deadline = time.monotonic() + args.max_runtime
    warming = True
    last_probe = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if warming and now - last_probe >= args.probe_interval:
            publish(batch([]))
            last_probe = now
        for sock, _ in poller.poll(timeout=int(args.probe_interval * 1000)):
            if sock is router:
                serve_replay()
                continue
            line = sys.stdin.readline()
            if not line:
                return 0  # stdin closed: the test is done
            if line.strip() == "go" and warming:
                warming = False
                truth = TrueSet()
                dropped = None
                for i, payload in enumerate(seqs):
                    truth.apply(payload)
                    seq = publish(payload, live=(i != args.drop_index))
                    if i == args.drop_index:
                        dropped = seq
                print(json.dumps({
                    "true_blocks": sorted([h, t] for h, t in truth.held),
                    "last_seq": next_seq - 1,
                    "dropped_seq": dropped,
                }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
