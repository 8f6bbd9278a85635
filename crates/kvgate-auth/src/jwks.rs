//! Where JWT verification keys come from: a JWKS file, re-read when it
//! changes, or a JWKS URL, fetched before the first request and refreshed in
//! the background (periodically, and soon after a token names an unknown
//! `kid`: a rotated key works once the issuer publishes it). A source that
//! stops answering or parsing keeps the last good set, with a warning.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::JwkSet;
use parking_lot::RwLock;

use crate::config::JwtConfig;
use crate::SetupError;

/// How often a JWKS file's modification time is checked.
const JWKS_RECHECK: Duration = Duration::from_secs(1);
/// The soonest a JWKS URL is fetched again for an unknown `kid`.
const JWKS_URL_MIN_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) enum Jwks {
    File(JwksFile),
    Url(Arc<JwksUrl>),
}

impl Jwks {
    pub(crate) fn new(cfg: &JwtConfig) -> Result<Self, SetupError> {
        match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(p), None) => Ok(Jwks::File(JwksFile::load(p.clone())?)),
            (None, Some(u)) => Ok(Jwks::Url(Arc::new(JwksUrl {
                url: u.clone(),
                refresh: Duration::from_secs(cfg.jwks_refresh_secs.max(1)),
                set: RwLock::new(Arc::new(JwkSet { keys: Vec::new() })),
                wake: tokio::sync::Notify::new(),
            }))),
            _ => Err(SetupError::Jwks {
                path: PathBuf::from(cfg.jwks_url.clone().unwrap_or_default()),
                reason: "set exactly one of jwt.jwks_file and jwt.jwks_url".into(),
            }),
        }
    }

    /// The current set; `unknown_kid`: a token named a key not in it.
    pub(crate) fn current(&self, unknown_kid: bool) -> Arc<JwkSet> {
        match self {
            Jwks::File(f) => f.current(unknown_kid),
            Jwks::Url(u) => {
                if unknown_kid {
                    u.wake.notify_one();
                }
                u.set.read().clone()
            }
        }
    }

    pub(crate) async fn start_refresh(&self) -> Result<(), SetupError> {
        let Jwks::Url(u) = self else {
            return Ok(());
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| u.error(e.to_string()))?;
        let set = fetch(&http, &u.url).await.map_err(|e| u.error(e))?;
        *u.set.write() = Arc::new(set);
        tokio::spawn(refresh(Arc::downgrade(u), http));
        Ok(())
    }
}

pub(crate) struct JwksUrl {
    url: String,
    refresh: Duration,
    set: RwLock<Arc<JwkSet>>,
    wake: tokio::sync::Notify,
}

impl JwksUrl {
    fn error(&self, reason: String) -> SetupError {
        SetupError::Jwks {
            path: PathBuf::from(&self.url),
            reason,
        }
    }
}

/// Refetches periodically and when woken for an unknown `kid` (at most once
/// per [`JWKS_URL_MIN_INTERVAL`]); stops with its authenticator.
async fn refresh(u: Weak<JwksUrl>, http: reqwest::Client) {
    let mut last = tokio::time::Instant::now();
    loop {
        let Some(src) = u.upgrade() else { return };
        let url = src.url.clone();
        let periodic = last + src.refresh;
        tokio::select! {
            _ = src.wake.notified() => {
                drop(src);
                let earliest = last + JWKS_URL_MIN_INTERVAL;
                tokio::time::sleep_until(earliest.min(periodic)).await;
            }
            _ = tokio::time::sleep_until(periodic) => {}
        }
        last = tokio::time::Instant::now();
        let Some(src) = u.upgrade() else { return };
        match fetch(&http, &url).await {
            Ok(set) => *src.set.write() = Arc::new(set),
            Err(reason) => {
                tracing::warn!(url = %url, %reason, "JWKS not refreshed; keeping the last good one")
            }
        }
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<JwkSet, String> {
    let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    resp.json::<JwkSet>().await.map_err(|e| e.to_string())
}

/// A JWKS file, re-read when its modification time changes (checked at most
/// once a second, and at once for an unknown `kid`: a rotated key works as
/// soon as the file has it). A file that stops parsing keeps the last good
/// set, with a warning.
pub(crate) struct JwksFile {
    path: PathBuf,
    state: RwLock<JwksState>,
}

struct JwksState {
    set: Arc<JwkSet>,
    modified: Option<SystemTime>,
    checked: Instant,
}

impl JwksFile {
    fn load(path: PathBuf) -> Result<Self, SetupError> {
        let (set, modified) = read_jwks(&path).map_err(|e| SetupError::Jwks {
            path: path.clone(),
            reason: e,
        })?;
        Ok(Self {
            path,
            state: RwLock::new(JwksState {
                set: Arc::new(set),
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// The current set; `now`: check the file whatever the last check's age.
    fn current(&self, now: bool) -> Arc<JwkSet> {
        {
            let s = self.state.read();
            if !now && s.checked.elapsed() < JWKS_RECHECK {
                return s.set.clone();
            }
        }
        let mut s = self.state.write();
        s.checked = Instant::now();
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified != s.modified {
            match read_jwks(&self.path) {
                Ok((set, m)) => {
                    tracing::info!(path = %self.path.display(), keys = set.keys.len(), "JWKS reloaded");
                    s.set = Arc::new(set);
                    s.modified = m;
                }
                Err(reason) => {
                    tracing::warn!(path = %self.path.display(), %reason, "JWKS not reloaded; keeping the last good one");
                    s.modified = modified;
                }
            }
        }
        s.set.clone()
    }
}

fn read_jwks(path: &std::path::Path) -> Result<(JwkSet, Option<SystemTime>), String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok((set, modified))
}
