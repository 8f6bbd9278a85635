//! Long-running no-panic check for the payload decoder: over a million inputs
//! made by mutating the fixture payloads (bit flips, inserts, deletes,
//! overwrites, splices, length-header tweaks) plus pure random bytes. Runs as a
//! plain binary (`cargo bench --bench fuzz_decode`) so it needs no fuzzing
//! toolchain; exits non-zero if any input panics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

use kvgate_wire::vllm::decode_batch;
use serde_json::Value;

const KV_EVENTS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/kv_events.json"
));
const REAL_032: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/real-vllm-0.32-events.txt"
));

const CASES: u64 = 1_200_000;

/// xorshift64*: deterministic, dependency-free, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let f: Value = serde_json::from_str(KV_EVENTS).unwrap();
    let mut out = Vec::new();
    for v in f["versions"].as_array().unwrap() {
        for form in ["int_block_hashes", "bytes_block_hashes"] {
            for c in v[form].as_array().unwrap() {
                out.push(hex::decode(c["payload_hex"].as_str().unwrap()).unwrap());
            }
        }
    }
    for l in REAL_032
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        out.push(hex::decode(l.split_whitespace().nth(2).unwrap()).unwrap());
    }
    out
}

/// Bytes that most often change how a decoder reads what follows.
const INTERESTING: &[u8] = &[
    0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
    0xc9, 0xca, 0xcb, 0xcc, 0xcf, 0xd0, 0xd3, 0xd4, 0xd8, 0xd9, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0,
    0xff,
];

fn mutate(rng: &mut Rng, p: &mut Vec<u8>, donor: &[u8]) {
    for _ in 0..1 + rng.below(6) {
        let len = p.len();
        match rng.below(8) {
            0 if len > 0 => p[rng.below(len)] ^= 1 << rng.below(8),
            1 => {
                let b = rng.next() as u8;
                p.insert(rng.below(len + 1), b)
            }
            2 if len > 0 => {
                p.remove(rng.below(len));
            }
            3 if len > 0 => p[rng.below(len)] = INTERESTING[rng.below(INTERESTING.len())],
            4 => p.truncate(rng.below(len + 1)),
            5 if len > 0 && !donor.is_empty() => {
                // Splice a slice of another payload in: valid structure, wrong place.
                let a = rng.below(donor.len());
                let b = a + rng.below(donor.len() - a + 1);
                let at = rng.below(len + 1);
                p.splice(at..at, donor[a..b].iter().copied());
            }
            6 if len >= 5 => {
                // Overwrite with a 32-bit length header claiming a lot.
                let at = rng.below(len - 4);
                p[at] = [0xdd, 0xdf, 0xdb, 0xc6][rng.below(4)];
                let n = (rng.next() as u32).to_be_bytes();
                p[at + 1..at + 5].copy_from_slice(&n);
            }
            7 if len > 1 => {
                // Duplicate a run of bytes (repeats fields and elements).
                let a = rng.below(len);
                let b = (a + rng.below(32)).min(len);
                let run: Vec<u8> = p[a..b].to_vec();
                p.splice(b..b, run);
            }
            _ => {}
        }
    }
}

fn main() -> ExitCode {
    // Silence the default hook so a panic (if any) is counted, not spammed.
    std::panic::set_hook(Box::new(|_| {}));
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut errors, mut panics) = (0u64, 0u64, 0u64);
    let mut first_panic: Option<Vec<u8>> = None;
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    for i in 0..CASES {
        buf.clear();
        if i % 8 == 0 {
            let n = rng.below(512);
            buf.extend((0..n).map(|_| rng.next() as u8));
        } else {
            buf.extend_from_slice(&seeds[rng.below(seeds.len())]);
            let donor = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, &mut buf, donor);
        }
        match catch_unwind(AssertUnwindSafe(|| decode_batch(&buf))) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => errors += 1,
            Err(_) => {
                panics += 1;
                first_panic.get_or_insert_with(|| buf.clone());
            }
        }
    }
    println!("fuzz_decode: {CASES} cases, {ok} ok, {errors} errors, {panics} panics");
    eprintln!("fuzz_decode: {:.2?}", start.elapsed());
    if let Some(p) = first_panic {
        eprintln!("first panicking input: {}", hex::encode(p));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
