#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Request-path tokenization: plain `tokenizers` encode vs kvgate's fast path.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvgate_tokenize::ModelTokenizer;

/// 100 common lowercase words, one token each with their leading space (what
/// kvgate-bench's filler prompts are made of), taken from the vocabulary.
fn words(tok: &ModelTokenizer) -> Vec<String> {
    (0..tok.vocab_size() as u32)
        .filter_map(|id| tok.decode(&[id], false).ok())
        .filter_map(|w| {
            let word = w.strip_prefix(' ')?;
            (word.len() >= 3 && word.chars().all(|c| c.is_ascii_lowercase()))
                .then(|| word.to_string())
        })
        .take(100)
        .collect()
}

/// `n` filler words, as kvgate-bench's `filler` builds its prompts (fixed LCG instead of StdRng).
fn filler(words: &[String], n: usize) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        s.push_str(&words[((state >> 33) % words.len() as u64) as usize]);
    }
    s
}

/// Mixed-script text: punctuation, digits, whitespace runs, CJK, emoji, accents.
fn varied() -> String {
    let para = "Grüße aus Zürich! The café's menu (v2.0) costs 12,50 € — naïve résumé.\n\n\
        東京は今日も晴れです。我们明天见，好吗？ 🎉🚀 emoji 👍🏽 and\ttabs\t\there;  \
        spaces   before. ΚΑΛΗΜΕΡΑ κόσμε, Привет мир! It's 3:45pm; they'll say \"we're done\" \
        at 2024-07-23T12:34:56Z.\r\n    indented code: fn main() { println!(\"{}\", x + 1); }\n";
    para.repeat(8)
}

fn bench_tokenize(c: &mut Criterion) {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let words = words(&tok);
    assert_eq!(words.len(), 100);
    for (name, text) in [
        ("filler_1000_words", filler(&words, 1000)),
        ("varied_unicode", varied()),
    ] {
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function("plain", |b| {
            b.iter(|| tok.encode_plain(&text, true).unwrap())
        });
        g.bench_function("fast", |b| b.iter(|| tok.encode(&text, true).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, bench_tokenize);
criterion_main!(benches);
