#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Request-path tokenization: plain `tokenizers` encode vs kvgate's fast path.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvgate_tokenize::ModelTokenizer;

/// The 100 filler words of kvgate-bench's workload.
const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
];

/// `n` filler words, as kvgate-bench's `filler` builds its prompts (fixed LCG instead of StdRng).
fn filler(n: usize) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        s.push_str(WORDS[((state >> 33) % WORDS.len() as u64) as usize]);
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
    for (name, text) in [
        ("filler_1000_words", filler(1000)),
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
