//! The fuzz's input generators: hostile headers, tokens, paths and bodies.

use super::*;

pub(super) const B64URL: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Characters that most often change how a header or token is read.
pub(super) const TRICKY: &[char] = &[
    ' ', '\t', '\n', '\r', '.', '=', '+', '/', '"', '\\', '\0', '{', '}', ',', ':', 'é',
    '\u{feff}', '\u{2028}', '\u{ff0e}', '🦀',
];

pub(super) fn random_text(rng: &mut StdRng, max: usize) -> String {
    let n = below(rng, max + 1);
    (0..n)
        .map(|_| match below(rng, 4) {
            0 => *pick(rng, TRICKY),
            1 => char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'),
            _ => char::from(*pick(rng, B64URL)),
        })
        .collect()
}

/// Random bytes, random strings and near-limit sizes as the whole header.
pub(super) fn random_header(rng: &mut StdRng) -> Option<String> {
    match below(rng, 6) {
        0 => None,
        1 => {
            let mut b = vec![0u8; below(rng, 300)];
            rng.fill(&mut b[..]);
            Some(String::from_utf8_lossy(&b).into_owned())
        }
        2 => {
            // Around the 8 KiB bound, JWT-shaped and not.
            let n = 8 * 1024 - 4 + below(rng, 16);
            let body = "A".repeat(n);
            let scheme = word(rng, "Bearer |bearer |Bearer  |Bearer eyJ");
            Some(format!("{scheme}{body}{}", word(rng, "|.a.b|é")))
        }
        _ => Some(random_text(rng, 200)),
    }
}

pub(super) fn bearer_random(rng: &mut StdRng) -> String {
    let scheme = word(
        rng,
        "Bearer |bearer |BEARER |Bearer|Bearer\t|Basic |Bearer  | Bearer ",
    );
    let prefix = word(rng, "||eyJ|sk-|eyJhbGciOiJIUzI1NiJ9.");
    let dots = below(rng, 5);
    let mut s = format!("{scheme}{prefix}{}", random_text(rng, 120));
    for _ in 0..dots {
        s.push('.');
        s.push_str(&random_text(rng, 60));
    }
    s
}

/// For a numeric claim: as a string, negative, float, huge, null, array,
/// object, bool, zero, or sane.
pub(super) fn weird_number(rng: &mut StdRng, sane: u64) -> Value {
    let all = format!(
        r#"["{sane}", -1, {}, {sane}.5, 1e308, {}, null, [{sane}], {{"exp": {sane}}}, true, 0, {sane}]"#,
        i64::MIN,
        u64::MAX
    );
    let mut all: Vec<Value> = serde_json::from_str(&all).unwrap();
    all.swap_remove(below(rng, all.len()))
}

/// For a string claim: a number, array, object, empty, null, huge, a
/// lookalike, random, or sane.
pub(super) fn weird_string(rng: &mut StdRng, sane: &str) -> Value {
    match below(rng, 10) {
        0 => json!("x".repeat(below(rng, 4000))),
        1 => json!(word(rng, "acme|globex|initech|globex\0|GLOBEX")),
        2 => json!(random_text(rng, 30)),
        n => [
            json!(7),
            json!([sane]),
            json!({ "id": sane }),
            json!(""),
            json!(null),
        ]
        .into_iter()
        .nth(n - 3)
        .unwrap_or(json!(sane)),
    }
}

pub(super) fn hostile_header(rng: &mut StdRng, s: &Setup) -> Value {
    let mut h = Map::new();
    let alg = match below(rng, 8) {
        0 => json!(256),
        1 => json!(null),
        2 => json!(["HS256"]),
        3 => json!({"alg": "HS256"}),
        _ => json!(word(
            rng,
            "none|None|NONE|nOnE||HS256|HS384|HS512|RS256|RS1|PS256|ES256|ES384|ES512|EdDSA|\
             ED25519|HS256 |RSA-OAEP"
        )),
    };
    if below(rng, 20) > 0 {
        h.insert("alg".into(), alg);
    }
    let kid = match below(rng, 10) {
        0 => Some(json!("k".repeat(1000 + below(rng, 8000)))),
        1 => Some(json!(1)),
        2 => Some(json!(["ed-1"])),
        3 => Some(json!({"kid": "rsa-1"})),
        4 => Some(json!(random_text(rng, 20))),
        5 => None,
        6 => Some(json!("../../../../etc/passwd")),
        _ => Some(json!(pick(rng, &s.signers).kid)),
    };
    if let Some(k) = kid {
        h.insert("kid".into(), k);
    }
    for _ in 0..below(rng, 4) {
        let (k, v) = match below(rng, 7) {
            0 => ("typ", weird_string(rng, "JWT")),
            1 => ("jwk", json!({"kty": "oct", "k": "c2VjcmV0"})),
            2 => (
                "jwk",
                json!({"kty": "RSA", "n": random_text(rng, 40), "e": 3}),
            ),
            3 => ("jku", json!("https://evil.example/jwks.json")),
            4 => ("crit", json!(["exp", 1, null])),
            5 => ("x5c", json!([random_text(rng, 30)])),
            _ => ("nested", nested(below(rng, 200))),
        };
        h.insert(k.into(), v);
    }
    Value::Object(h)
}

pub(super) fn nested(depth: usize) -> Value {
    // Built by hand: `json!` would deep-copy `v` at every level.
    let mut v = json!(1);
    for _ in 0..depth {
        v = Value::Object(Map::from_iter([("a".to_string(), Value::Array(vec![v]))]));
    }
    v
}

pub(super) fn hostile_claims(rng: &mut StdRng) -> Value {
    let t = now();
    let mut c = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory",
        "contract": "globex", "exp": t + 600, "nbf": t - 10});
    let obj = c.as_object_mut().unwrap();
    for _ in 0..below(rng, 4) {
        match below(rng, 8) {
            0 => obj.insert("exp".into(), weird_number(rng, t + 600)),
            1 => obj.insert("nbf".into(), weird_number(rng, t - 10)),
            2 => obj.insert("contract".into(), weird_string(rng, "globex")),
            3 => obj.insert("sub".into(), weird_string(rng, "mallory")),
            4 => obj.insert("iss".into(), weird_string(rng, ISSUER)),
            5 => obj.insert("aud".into(), json!([AUDIENCE, 5, "other"])),
            6 => obj.remove(*pick(rng, &["exp", "nbf", "contract", "sub", "iss", "aud"])),
            _ => obj.insert(random_text(rng, 8), nested(below(rng, 10))),
        };
    }
    c
}

pub(super) fn b64(rng: &mut StdRng, bytes: &[u8]) -> String {
    match below(rng, 16) {
        0 => URL_SAFE.encode(bytes),
        1 => STANDARD.encode(bytes),
        _ => URL_SAFE_NO_PAD.encode(bytes),
    }
}

/// A JWT-shaped token: hostile header and claims, a signature that is random,
/// transplanted, or real (then only its own claims may come out of it).
pub(super) fn jwt_like(rng: &mut StdRng, s: &Setup) -> (Option<String>, Expect) {
    // Half are really signed (with the cheap keys: RSA and P-256 signing are
    // slow), half of those under a plain header, so the claims get parsed.
    let signer = match below(rng, 8) {
        0..=2 => Some(&s.signers[3]),
        3 => Some(&s.signers[0]),
        _ => None,
    };
    let header = match signer {
        Some(k) if below(rng, 2) == 0 => match below(rng, 2) {
            0 => json!({"alg": k.alg, "kid": k.kid}),
            _ => json!({"alg": k.alg, "typ": "JWT"}),
        },
        _ => hostile_header(rng, s),
    };
    let claims = hostile_claims(rng);
    let mut h_text = header.to_string().into_bytes();
    if below(rng, 10) == 0 {
        mutate_bytes(rng, &mut h_text, 3);
    }
    let signing_input = format!(
        "{}.{}",
        b64(rng, &h_text),
        b64(rng, claims.to_string().as_bytes())
    );
    let sig = match (signer, below(rng, 4)) {
        (Some(k), _) => {
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &k.key, k.alg).unwrap()
        }
        (None, 0) => String::new(),
        (None, 1) => pick(rng, &s.signatures).clone(),
        (None, 2) => {
            let mut b = vec![0u8; *pick(rng, &[32usize, 64, 256, 48, 0, 1])];
            rng.fill(&mut b[..]);
            URL_SAFE_NO_PAD.encode(b)
        }
        (None, _) => random_text(rng, 100),
    };
    let token = format!("Bearer {signing_input}.{sig}");
    // Only a signature by the key the header names, under its algorithm,
    // vouches for the claims.
    let expect = match (signer, serde_json::from_slice::<Value>(&h_text)) {
        (Some(signer), Ok(h))
            if h.get("alg") == Some(&json!(signer.alg))
                && h.get("kid").is_none_or(|k| k.is_null() || k == signer.kid) =>
        {
            match (claims["contract"].as_str(), claims["sub"].as_str()) {
                (Some(c), Some(u)) => Expect::Signed((c.into(), u.into())),
                _ => Expect::Refused,
            }
        }
        _ => Expect::Refused,
    };
    (Some(token), expect)
}

/// 1..=`max` of: bit flips, inserts, deletes, truncation, duplicated runs.
pub(super) fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>, max: usize) {
    for _ in 0..1 + below(rng, max) {
        let len = b.len();
        match below(rng, 6) {
            0 if len > 0 => b[below(rng, len)] ^= 1 << below(rng, 8),
            1 => {
                let c = [*pick(rng, B64URL), rng.random::<u8>()][below(rng, 2)];
                b.insert(below(rng, len + 1), c)
            }
            2 if len > 0 => {
                b.remove(below(rng, len));
            }
            3 => b.truncate(below(rng, len + 1)),
            4 if len > 1 => {
                let a = below(rng, len);
                let e = (a + below(rng, 64)).min(len);
                let run = b[a..e].to_vec();
                b.splice(e..e, run);
            }
            5 if len > 0 => b[below(rng, len)] = *pick(rng, B64URL),
            _ => {}
        }
    }
}

/// A valid credential, mutated (or now and then not at all).
pub(super) fn mutated_valid(rng: &mut StdRng, s: &Setup) -> (Option<String>, Expect) {
    let orig = pick(rng, &s.valid);
    if below(rng, 40) == 0 {
        let t = orig
            .bearer
            .replacen("Bearer", word(rng, "Bearer|bearer|BEARER"), 1);
        return (Some(t), Expect::Exactly(orig.who.clone()));
    }
    let mut allowed = vec![orig.who.clone()];
    let mut b = orig.bearer.clone().into_bytes();
    match below(rng, 4) {
        0 => {
            // Swap in another valid token's segment: a splice may only ever
            // yield the donor's own token.
            let donor = pick(rng, &s.valid);
            let seg = below(rng, 3);
            let mut parts: Vec<String> = orig.bearer.split('.').map(str::to_string).collect();
            let theirs: Vec<&str> = donor.bearer.split('.').collect();
            if let (Some(p), Some(t)) = (parts.get_mut(seg), theirs.get(seg)) {
                *p = t.to_string();
                allowed.push(donor.who.clone());
            }
            b = parts.join(".").into_bytes();
            if below(rng, 2) == 0 {
                mutate_bytes(rng, &mut b, 1);
            }
        }
        1 => {
            // Repeat or drop a segment.
            let mut parts: Vec<&str> = orig.bearer.split('.').collect();
            let i = below(rng, parts.len());
            if below(rng, 2) == 0 {
                parts.insert(i, parts[i]);
            } else {
                parts.remove(i);
            }
            b = parts.join(".").into_bytes();
        }
        _ => mutate_bytes(rng, &mut b, 4),
    }
    let t = String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into());
    // Unchanged (or a splice that rebuilt a whole valid token): must pass.
    if let Some(v) = s.valid.iter().find(|v| v.bearer == t) {
        return (Some(t), Expect::Exactly(v.who.clone()));
    }
    (Some(t), Expect::Mutated(allowed))
}

pub(super) fn random_path(rng: &mut StdRng) -> String {
    // Separators, dots and their encodings, lookalikes, admin endpoints.
    const PIECES: &str =
        "/|/|/|v1|chat|completions|models|.|..|%2f|%2F|%2e|%2E|%5c|%5C|%00|%25|%|\\|?|#|\
        x=1|;|／|∕|．|é|\0| |reset_prefix_cache|collective_rpc|%u002f|%c0%af|V1|%252f|\
        /v1/chat/completions|/v1/completions|/v1/models";
    match below(rng, 4) {
        0 => {
            let mut p = pick(rng, &kvgate_auth::paths::INFERENCE_PATHS)
                .to_string()
                .into_bytes();
            mutate_bytes(rng, &mut p, 2);
            String::from_utf8_lossy(&p).into_owned()
        }
        1 => random_text(rng, 40),
        _ => (0..below(rng, 12)).map(|_| word(rng, PIECES)).collect(),
    }
}

pub(super) fn random_value(rng: &mut StdRng, depth: usize) -> Value {
    match below(rng, if depth == 0 { 5 } else { 7 }) {
        0 => json!(null),
        1 => json!(rng.random::<i64>()),
        2 => json!(rng.random::<f64>() * 1e6),
        3 => json!(random_text(rng, 20)),
        4 => json!(rng.random::<bool>()),
        5 => Value::Array(
            (0..below(rng, 4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => random_object(rng, depth - 1),
    }
}

pub(super) fn random_object(rng: &mut StdRng, depth: usize) -> Value {
    const KEYS: &str = "model|messages|prompt|stream|cache_salt|kv_transfer_params|priority|\
        request_id|vllm_xargs|CACHE_SALT|cache_salt |cache\0salt|cache_sal|lmcache.tag.cachesalt|\
        x-request-id";
    let mut m = Map::new();
    for _ in 0..below(rng, 8) {
        let k = if below(rng, 5) == 0 {
            random_text(rng, 10)
        } else {
            word(rng, KEYS).to_string()
        };
        m.insert(k, random_value(rng, depth));
    }
    Value::Object(m)
}

pub(super) fn random_body(rng: &mut StdRng) -> Vec<u8> {
    let mut b = serde_json::to_vec(&random_object(rng, 3)).unwrap();
    if below(rng, 3) == 0 {
        mutate_bytes(rng, &mut b, 3);
    }
    b
}
