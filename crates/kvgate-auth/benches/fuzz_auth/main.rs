//! Long-running no-panic, no-forgery check for the contract layer's parsers:
//! over a million `Authorization` values (random bytes and strings, `Bearer`
//! plus random, JWT-shaped tokens with hostile headers and claims, mutations
//! of tokens signed with the fixture keys), request paths and JSON bodies.
//! Runs as a plain binary (`cargo bench -p kvgate-auth --bench fuzz_auth`);
//! exits non-zero if any input panics, if a token is accepted as a principal
//! its signature does not vouch for (a forgery), or if the path allowlist or
//! the privileged-field filter breaks its contract.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kvgate_auth::fields::{strip_privileged, PRIVILEGED_FIELDS};
use kvgate_auth::paths::allowed_path;
use kvgate_auth::principal::{api_key_sha256, Authenticator};
use kvgate_auth::{ApiKeySpec, FieldPolicy, JwtConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

mod inputs;
use inputs::*;
#[path = "../../tests/support/mod.rs"]
mod support;
use support::{fixture, now, read};

const CASES: u64 = 1_200_000;
const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "kvgate";

/// Uniform in `0..n` (0 when `n` is 0).
fn below(rng: &mut StdRng, n: usize) -> usize {
    rng.random_range(0..n.max(1))
}

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[below(rng, xs.len())]
}

/// One of the `|`-separated words of `list`.
fn word(rng: &mut StdRng, list: &'static str) -> &'static str {
    let n = list.split('|').count();
    list.split('|').nth(below(rng, n)).unwrap_or("")
}

type Who = (String, String);

/// A fixture signing key, its algorithm and the kid of its JWKS entry.
struct Signer {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
}

/// A token the fixture keys really signed, and whom it names.
struct Valid {
    bearer: String,
    who: Who,
}

/// Which principals an acceptance may name; anything else is a forgery.
enum Expect {
    /// Nothing vouches for this credential.
    Refused,
    /// Really signed: accepted as its own claims, or refused.
    Signed(Who),
    /// A mutated valid credential: accepted as the original (or a splice's
    /// donor), or refused.
    Mutated(Vec<Who>),
    /// An unmutated valid credential: must be accepted as this.
    Exactly(Who),
}

enum Input {
    /// The `Authorization` value, whether to the API-keys-only authenticator.
    Header(Option<String>, bool, Expect),
    Path(String),
    Body(Vec<u8>),
}

#[derive(Default)]
struct Tally {
    n: Counts,
    failures: Vec<String>,
}

#[derive(Default, Debug)]
struct Counts {
    /// Accepted: valid credentials as made.
    pristine: u64,
    /// Accepted: crafted claims really signed by the key the header names.
    signed_crafted: u64,
    /// Accepted: mutated, yet the same credential (scheme case, spaces).
    mutated_equivalent: u64,
    refused: u64,
    paths_ok: u64,
    paths_refused: u64,
    bodies: u64,
    bodies_unparsed: u64,
}

struct Setup {
    auth: Authenticator,
    keys_only: Authenticator,
    signers: Vec<Signer>,
    valid: Vec<Valid>,
    /// Signatures of the valid tokens, for transplanting.
    signatures: Vec<String>,
}

fn setup() -> Setup {
    let keys = [
        ("sk-acme-1", "acme", "svc"),
        ("sk-initech-2", "initech", "ops"),
    ];
    let specs: Vec<ApiKeySpec> = keys
        .iter()
        .map(|(k, c, s)| ApiKeySpec {
            sha256: api_key_sha256(k),
            contract: c.to_string(),
            subject: Some(s.to_string()),
        })
        .collect();
    // Every accepted algorithm, so each key-type/alg mismatch is reached.
    let jwt: JwtConfig = serde_yaml::from_str(&format!(
        "{{jwks_file: {}, issuer: '{ISSUER}', audience: {AUDIENCE}, algorithms: [RS256, RS384, \
         RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512]}}",
        fixture("jwks.json").display()
    ))
    .unwrap();
    let ed = EncodingKey::from_ed_pem(&read("ed25519.pem")).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&read("ec.pem")).unwrap();
    let hs = EncodingKey::from_secret(&read("hs256.secret"));
    let signer = |alg, kid, key| Signer { alg, kid, key };
    let signers = vec![
        signer(Algorithm::EdDSA, "ed-1", ed),
        signer(Algorithm::RS256, "rsa-1", rsa),
        signer(Algorithm::ES256, "ec-1", ec),
        signer(Algorithm::HS256, "hs-1", hs),
    ];
    let mut valid: Vec<Valid> = keys
        .iter()
        .map(|(k, c, s)| Valid {
            bearer: format!("Bearer {k}"),
            who: (c.to_string(), s.to_string()),
        })
        .collect();
    for s in &signers {
        for (contract, sub) in [("globex", "alice"), ("initech", "bob")] {
            for kid in [Some(s.kid), None] {
                let mut h = Header::new(s.alg);
                h.kid = kid.map(str::to_string);
                let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub,
                    "contract": contract, "exp": now() + 86_400, "nbf": now() - 10});
                let t = jsonwebtoken::encode(&h, &claims, &s.key).unwrap();
                valid.push(Valid {
                    bearer: format!("Bearer {t}"),
                    who: (contract.into(), sub.into()),
                });
            }
        }
    }
    let signatures = valid
        .iter()
        .filter_map(|v| v.bearer.rsplit_once('.').map(|(_, s)| s.to_string()))
        .collect();
    Setup {
        auth: Authenticator::new(&specs, Some(&jwt)).unwrap(),
        keys_only: Authenticator::new(&specs, None).unwrap(),
        signers,
        valid,
        signatures,
    }
}

fn check_auth(s: &Setup, t: &mut Tally, value: Option<&str>, keys_only: bool, expect: &Expect) {
    let auth = if keys_only { &s.keys_only } else { &s.auth };
    let got = auth
        .authenticate(value)
        .ok()
        .map(|p| (p.contract, p.subject));
    let shown = || format!("{:.200?}", value.unwrap_or("<none>"));
    match (got, expect) {
        (None, Expect::Exactly(who)) => t
            .failures
            .push(format!("valid credential of {who:?} refused: {}", shown())),
        (None, _) => t.n.refused += 1,
        (Some(who), Expect::Exactly(w)) if &who == w => t.n.pristine += 1,
        (Some(who), Expect::Signed(w)) if &who == w => t.n.signed_crafted += 1,
        (Some(who), Expect::Mutated(ws)) if ws.contains(&who) => t.n.mutated_equivalent += 1,
        (Some(who), _) => t
            .failures
            .push(format!("FORGERY: accepted as {who:?}: {}", shown())),
    }
}

fn check_path(t: &mut Tally, raw: &str) {
    match allowed_path(raw) {
        Ok(p) if raw.split_once('?').map_or(raw, |(p, _)| p) == p => t.n.paths_ok += 1,
        Ok(p) => t
            .failures
            .push(format!("path {raw:?} allowed as {p:?}, not exactly")),
        Err(_) => t.n.paths_refused += 1,
    }
}

fn check_body(t: &mut Tally, raw: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Map<String, Value>>(raw) else {
        t.n.bodies_unparsed += 1;
        return;
    };
    let present: Vec<&str> = PRIVILEGED_FIELDS
        .into_iter()
        .filter(|f| body.contains_key(*f))
        .collect();
    let mut dropped = body.clone();
    let ok = match strip_privileged(&mut dropped, FieldPolicy::Drop) {
        Ok(names) => {
            names == present && PRIVILEGED_FIELDS.iter().all(|f| !dropped.contains_key(*f))
        }
        Err(_) => false,
    };
    let mut refused = body.clone();
    let ok = ok
        && match strip_privileged(&mut refused, FieldPolicy::Refuse) {
            Ok(names) => names.is_empty() && present.is_empty() && refused == body,
            Err(e) => present.first() == Some(&e.0),
        };
    if ok {
        t.n.bodies += 1;
    } else {
        t.failures.push(format!(
            "privileged fields {present:?} mishandled in {:.200}",
            String::from_utf8_lossy(raw)
        ));
    }
}

/// Case classes, by share of the run (out of 20).
const CLASSES: [(&str, u64); 6] = [
    ("random header values", 3),
    ("Bearer + random", 3),
    ("JWT-shaped, hostile", 5),
    ("mutated valid credentials", 4),
    ("paths", 3),
    ("bodies", 2),
];

fn generate(rng: &mut StdRng, s: &Setup, class: usize) -> Input {
    let keys_only = below(rng, 8) == 0;
    let (value, mut expect) = match class {
        0 => (random_header(rng), Expect::Refused),
        1 => (Some(bearer_random(rng)), Expect::Refused),
        2 => jwt_like(rng, s),
        3 => mutated_valid(rng, s),
        4 => return Input::Path(random_path(rng)),
        _ => return Input::Body(random_body(rng)),
    };
    // Without a JWT verifier only API keys may be accepted.
    if keys_only && value.as_deref().is_some_and(|v| v.contains('.')) {
        expect = Expect::Refused;
    }
    Input::Header(value, keys_only, expect)
}

fn main() -> ExitCode {
    // Silence the default hook so a panic (if any) is counted, not spammed.
    std::panic::set_hook(Box::new(|_| {}));
    let s = setup();
    let mut rng = StdRng::seed_from_u64(0x6b76_6761_7465_0014);
    let mut t = Tally::default();
    let (mut panics, mut first_panic) = (0u64, None::<String>);
    let mut spent = [std::time::Duration::ZERO; CLASSES.len()];
    let start = std::time::Instant::now();
    let slots: Vec<usize> = (0..CLASSES.len())
        .flat_map(|c| std::iter::repeat_n(c, CLASSES[c].1 as usize))
        .collect();
    for i in 0..CASES {
        let class = slots[i as usize % slots.len()];
        let began = std::time::Instant::now();
        let input = generate(&mut rng, &s, class);
        let run = catch_unwind(AssertUnwindSafe(|| match &input {
            Input::Header(value, keys_only, expect) => {
                check_auth(&s, &mut t, value.as_deref(), *keys_only, expect)
            }
            Input::Path(p) => check_path(&mut t, p),
            Input::Body(b) => check_body(&mut t, b),
        }));
        spent[class] += began.elapsed();
        if run.is_err() {
            panics += 1;
            first_panic.get_or_insert_with(|| match &input {
                Input::Header(value, ..) => format!("header {value:?}"),
                Input::Path(p) => format!("path {p:?}"),
                Input::Body(b) => format!("body {:?}", String::from_utf8_lossy(b)),
            });
        }
    }
    let accepted = t.n.pristine + t.n.signed_crafted + t.n.mutated_equivalent;
    println!(
        "fuzz_auth: {CASES} cases, {accepted} accepted (valid tokens only), {panics} panics, {} \
         failures",
        t.failures.len()
    );
    let per_class: Vec<String> = CLASSES
        .iter()
        .zip(spent)
        .map(|((name, _), d)| format!("{name} {:.1}s", d.as_secs_f64()))
        .collect();
    let (elapsed, per_class) = (start.elapsed(), per_class.join(", "));
    eprintln!("fuzz_auth: {elapsed:.1?} ({per_class}); {:?}", t.n);
    for f in t.failures.iter().take(10) {
        eprintln!("  {f}");
    }
    if let Some(p) = &first_panic {
        eprintln!("first panicking input: {p:.500}");
    }
    if panics > 0 || !t.failures.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
