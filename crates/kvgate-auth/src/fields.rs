//! Body fields and headers that steer the engine's cache, KV transfer or
//! scheduling. Only kvgate sets them (per contract where that applies); a
//! client's are dropped or refused ([`FieldPolicy`]), and audited.

use serde_json::{Map, Value};

use crate::config::FieldPolicy;

/// vLLM request fields a client may never set:
/// - `cache_salt`: which cache a prompt may hit (the contract's, always);
/// - `kv_transfer_params`: LMCache's cache tag and the P/D connectors'
///   remote host, port and block ids;
/// - `priority`: scheduling order (per contract);
/// - `request_id`: the engine's request identity;
/// - `vllm_xargs`: free-form arguments to engine plugins.
pub const PRIVILEGED_FIELDS: [&str; 5] = [
    "cache_salt",
    "kv_transfer_params",
    "priority",
    "request_id",
    "vllm_xargs",
];

/// Headers vLLM reads as request identity or placement hints.
pub const PRIVILEGED_HEADERS: [&str; 2] = ["x-request-id", "x-data-parallel-rank"];

/// LMCache's tag key in `kv_transfer_params` (it appears in every chunk key
/// as `@cachesalt%VALUE`).
pub const LMCACHE_SALT_TAG: &str = "lmcache.tag.cachesalt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field '{0}' is set by the gateway and may not be sent by clients")]
pub struct FieldRefused(pub &'static str);

/// Removes the client's privileged fields (or refuses the request under
/// [`FieldPolicy::Refuse`]); returns the names removed.
pub fn strip_privileged(
    body: &mut Map<String, Value>,
    policy: FieldPolicy,
) -> Result<Vec<&'static str>, FieldRefused> {
    let present: Vec<&'static str> = PRIVILEGED_FIELDS
        .into_iter()
        .filter(|f| body.contains_key(*f))
        .collect();
    if let (FieldPolicy::Refuse, Some(f)) = (policy, present.first()) {
        return Err(FieldRefused(f));
    }
    for f in &present {
        body.remove(*f);
    }
    Ok(present)
}

/// What kvgate itself sets: the contract's salt as vLLM's `cache_salt` and
/// as LMCache's tag (vLLM does not pass `cache_salt` on to LMCache), and the
/// contract's priority.
pub fn contract_fields(
    cache_salt: &str,
    lmcache_tag: bool,
    priority: Option<i64>,
) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("cache_salt".into(), Value::String(cache_salt.to_string()));
    if lmcache_tag {
        let mut params = Map::new();
        params.insert(
            LMCACHE_SALT_TAG.into(),
            Value::String(cache_salt.to_string()),
        );
        fields.insert("kv_transfer_params".into(), Value::Object(params));
    }
    if let Some(p) = priority {
        fields.insert("priority".into(), Value::from(p));
    }
    fields
}

/// `body` (a JSON object's text) with `fields` as its first members, the
/// client's bytes after them untouched: no re-encoding of the whole body.
/// Only for a body that holds none of `fields`' names (after
/// [`strip_privileged`] found nothing to drop), so no name appears twice.
/// None if `body` does not start with `{`.
pub fn prepend_fields(body: &[u8], fields: &Map<String, Value>) -> Option<Vec<u8>> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let mut out = Vec::with_capacity(body.len() + 64 * fields.len());
    serde_json::to_writer(&mut out, fields).ok()?;
    // `out` is `{...}`: reopen it and let the client's members follow.
    out.pop();
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    if !fields.is_empty() && !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn every_privileged_field_is_dropped_or_refused() {
        let sent = json!({"model": "m", "cache_salt": "x", "kv_transfer_params": {"remote_host": "evil"},
            "priority": -100, "request_id": "r", "vllm_xargs": {"a": 1}, "prompt": "hi"});
        let mut body = obj(sent.clone());
        let dropped = strip_privileged(&mut body, FieldPolicy::Drop).unwrap();
        assert_eq!(dropped, PRIVILEGED_FIELDS.to_vec());
        assert_eq!(body.len(), 2, "{body:?}");
        let mut body = obj(sent);
        assert_eq!(
            strip_privileged(&mut body, FieldPolicy::Refuse),
            Err(FieldRefused("cache_salt"))
        );
        let mut clean = obj(json!({"model": "m"}));
        assert_eq!(
            strip_privileged(&mut clean, FieldPolicy::Refuse),
            Ok(vec![])
        );
    }

    #[test]
    fn kvgate_sets_the_salt_twice_and_the_priority() {
        let fields = contract_fields("abc", true, Some(3));
        assert_eq!(
            Value::Object(fields),
            json!({"cache_salt": "abc",
                "kv_transfer_params": {"lmcache.tag.cachesalt": "abc"}, "priority": 3})
        );
    }

    #[test]
    fn fields_are_prepended_to_the_clients_bytes() {
        let fields = contract_fields("abc", true, None);
        let body = br#" {"model": "m",  "messages": [{"role":"user","content":"hi"}]}"#;
        let out = prepend_fields(body, &fields).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.ends_with(r#""model": "m",  "messages": [{"role":"user","content":"hi"}]}"#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"cache_salt": "abc", "kv_transfer_params": {"lmcache.tag.cachesalt": "abc"},
                "model": "m", "messages": [{"role": "user", "content": "hi"}]})
        );
        let out = prepend_fields(b"{ }", &fields).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            Value::Object(fields.clone())
        );
        assert_eq!(prepend_fields(b"[1]", &fields), None);
        assert_eq!(prepend_fields(b"   ", &fields), None);
    }
}
