//! The endpoint allowlist: only OpenAI inference endpoints are ever proxied.
//! vLLM's admin and debug endpoints (`/reset_prefix_cache`,
//! `/collective_rpc`, `/pause`, `/update_weights`, `/sleep`, ...) are never
//! reachable, whatever the spelling: a path is matched exactly, after
//! refusing anything a server or proxy might normalize into another path
//! (empty or dot segments, backslashes, percent-encoded separators or dots).

/// The paths kvgate forwards to engines.
pub const INFERENCE_PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/models"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error("path is not in canonical form")]
    NotCanonical,
    #[error("path is not an inference endpoint")]
    NotAllowed,
}

/// The allowlisted path `raw` (query string ignored) names, or why none.
pub fn allowed_path(raw: &str) -> Result<&'static str, PathRefused> {
    let path = raw.split_once('?').map_or(raw, |(p, _)| p);
    let lower = path.to_ascii_lowercase();
    let tricky = !path.starts_with('/')
        || path.contains('\\')
        || path.contains("//")
        || ["%2f", "%5c", "%2e", "%00"]
            .iter()
            .any(|e| lower.contains(e))
        || path.split('/').any(|seg| seg == "." || seg == "..");
    if tricky {
        return Err(PathRefused::NotCanonical);
    }
    INFERENCE_PATHS
        .into_iter()
        .find(|p| *p == path)
        .ok_or(PathRefused::NotAllowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_inference_paths_pass() {
        for p in INFERENCE_PATHS {
            assert_eq!(allowed_path(p), Ok(p));
        }
        assert_eq!(allowed_path("/v1/completions?x=1"), Ok("/v1/completions"));
        for p in [
            "/reset_prefix_cache",
            "/collective_rpc",
            "/pause",
            "/update_weights",
            "/sleep",
            "/wake_up",
            "/v1/models/",
            "/V1/completions",
        ] {
            assert_eq!(allowed_path(p), Err(PathRefused::NotAllowed), "{p}");
        }
        for p in [
            "//v1/completions",
            "/v1//completions",
            "/v1/completions/../../reset_prefix_cache",
            "/v1/./completions",
            "/v1%2Fcompletions",
            "/v1%2fchat%2Fcompletions",
            "/v1/%2e%2e/reset_prefix_cache",
            "/v1\\completions",
            "v1/completions",
            "/v1/completions%00",
        ] {
            assert_eq!(allowed_path(p), Err(PathRefused::NotCanonical), "{p}");
        }
    }
}
