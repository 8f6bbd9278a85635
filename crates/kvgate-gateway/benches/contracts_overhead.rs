#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What the contract layer costs per request: the same gateway in front of
//! the same instant upstream, without contracts (A) and with API-key auth,
//! rate limits that never trigger and the audit log (`fsync: batch`) on (B),
//! measured side by side in one process. Closed-loop clients hit A and B in
//! interleaved rounds (A, B, A, B, ...) so machine noise lands on both.
//! Round robin routing, so tokenization does not hide the difference.
//!
//! `cargo bench -p kvgate-gateway --bench contracts_overhead` prints
//! requests/s and p50/p99 per gateway, the B/A throughput ratio and the added
//! p99, writes `target/bench/contracts_overhead/report.{md,json}`, and exits
//! non-zero if a request failed or B's audit log does not verify with one
//! `request` record per request B served. Knobs (env): `CONTRACTS_BENCH_ROUNDS`
//! (6), `CONTRACTS_BENCH_ROUND_MS` (3000), `CONTRACTS_BENCH_CLIENTS` (16);
//! `CONTRACTS_BENCH_B=off` runs B without contracts (the A/A control: the
//! bench's own bias, about 1.0x); `CONTRACTS_BENCH_MARKS=1` prints each
//! round's start as CLOCK_MONOTONIC, to split a `perf record -k
//! CLOCK_MONOTONIC` profile into A's rounds and B's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use kvgate_auth::audit::FsyncPolicy;
use kvgate_auth::{AuthConfig, KeyRef, Limits};
use kvgate_gateway::{EndpointConfig, Gateway, GatewayConfig, StaticDiscovery};
use kvgate_router::{Policy, RouterConfig};
use serde_json::{json, Value};

/// The allocator the `kvgate` binary runs on, so the bench measures what ships.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const API_KEY: &str = "bench-key-0123456789";
const CONTRACT: &str = "bench";
const WARMUP: Duration = Duration::from_millis(1000);

/// The fake engine's whole answer: a small non-streaming chat completion.
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}"#;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

async fn fake_engine() -> String {
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async { ([("content-type", "application/json")], COMPLETION) }),
        )
        .route("/health", get(|| async { "" }))
        .route(
            "/metrics",
            get(|| async { "vllm:num_requests_waiting{engine=\"0\"} 0\n" }),
        );
    serve(app).await
}

fn config(upstream: &str) -> GatewayConfig {
    GatewayConfig {
        endpoints: vec![EndpointConfig::new(upstream, "m", 16)],
        router: RouterConfig {
            policy: Policy::RoundRobin,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// B's contracts: one API key, limits far above the load, audit to `dir`.
/// For finding where the time goes, `CONTRACTS_BENCH_B_LIMITS=off` and
/// `CONTRACTS_BENCH_B_AUDIT=never|off` take parts away (the goals are for
/// the default: all on, `fsync: batch`).
fn contracts(dir: &std::path::Path) -> AuthConfig {
    let master = dir.join("master.key");
    std::fs::write(&master, "contracts overhead bench master key").unwrap();
    let mut c = AuthConfig::for_api_keys(&[(API_KEY, CONTRACT)], KeyRef::File(master));
    if std::env::var("CONTRACTS_BENCH_B_LIMITS").as_deref() != Ok("off") {
        c.contracts[0].limits = Limits {
            requests_per_minute: Some(10_000_000),
            tokens_per_minute: Some(4_000_000_000),
            max_concurrent: None,
        };
    }
    match std::env::var("CONTRACTS_BENCH_B_AUDIT").as_deref() {
        Ok("off") => return c,
        Ok("never") => c.audit.fsync = FsyncPolicy::Never,
        _ => c.audit.fsync = FsyncPolicy::Batch,
    }
    c.audit.path = Some(dir.join("audit.jsonl"));
    c
}

/// The contract layer's own calls, without HTTP: mean µs per call of what a
/// request pays (`authenticate`, `authorize`, `admit`, one audit record),
/// with B's config (its audit log moved aside).
fn layer_costs(cfg: &AuthConfig, dir: &std::path::Path) -> Value {
    let mut cfg = cfg.clone();
    cfg.audit.path = cfg
        .audit
        .path
        .as_ref()
        .map(|_| dir.join("layer-audit.jsonl"));
    let s = kvgate_auth::Sentinel::new(&cfg).unwrap();
    let header = format!("Bearer {API_KEY}");
    let n = 20_000;
    let mean_us = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        // Two decimals: enough for µs, short in the report.
        (t.elapsed().as_secs_f64() * 1e8 / f64::from(n)).round() / 100.0
    };
    let p = s.authenticate(Some(&header)).unwrap();
    let authenticate = mean_us(&mut || {
        std::hint::black_box(s.authenticate(Some(&header)).unwrap());
    });
    let authorize = mean_us(&mut || {
        std::hint::black_box(s.authorize(p.clone(), "m").unwrap());
    });
    let admit = mean_us(&mut || {
        let a = s.authorize(p.clone(), "m").unwrap();
        std::hint::black_box(s.admit(a, 12).unwrap());
    });
    let admit = ((admit - authorize) * 100.0).round() / 100.0;
    let record = mean_us(&mut || {
        s.audit().record(
            kvgate_auth::audit::AuditRecord::new(kvgate_auth::audit::kind::REQUEST)
                .contract(CONTRACT)
                .model("m")
                .status(200),
        )
    });
    json!({"authenticate_us": authenticate, "authorize_us": authorize, "admit_us": admit,
        "audit_record_us": record})
}

async fn start(cfg: GatewayConfig) -> (String, Arc<Gateway>) {
    let discovery = Arc::new(StaticDiscovery::new(cfg.endpoints.clone()).unwrap());
    let gw = Gateway::start(cfg, discovery).await.unwrap();
    (serve(gw.router()).await, gw)
}

/// One closed-loop phase: `clients` senders for `length`.
#[derive(Default)]
struct Phase {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    /// Per request, microseconds.
    latencies: Vec<u32>,
}

async fn phase(client: &reqwest::Client, url: &str, clients: usize, length: Duration) -> Phase {
    let url = format!("{url}/v1/chat/completions");
    let body = serde_json::to_vec(&json!({"model": "m", "max_tokens": 1,
        "messages": [{"role": "user", "content": "Say ok."}]}))
    .unwrap();
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut p = Phase::default();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .bearer_auth(API_KEY)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    p.latencies.push(t.elapsed().as_micros() as u32);
                    if ok {
                        p.ok += 1;
                    } else {
                        p.failed += 1;
                    }
                }
                p
            })
        })
        .collect();
    let mut all = Phase::default();
    for t in tasks {
        let p = t.await.unwrap();
        all.ok += p.ok;
        all.failed += p.failed;
        all.latencies.extend(p.latencies);
    }
    all.elapsed = start.elapsed();
    all
}

/// A gateway's rounds together.
#[derive(Default)]
struct Side {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    latencies: Vec<u32>,
    round_rps: Vec<f64>,
}

impl Side {
    fn add(&mut self, p: Phase) {
        self.round_rps.push(p.ok as f64 / p.elapsed.as_secs_f64());
        self.ok += p.ok;
        self.failed += p.failed;
        self.elapsed += p.elapsed;
        self.latencies.extend(p.latencies);
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile, microseconds (sorts once).
    fn quantile(&mut self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies[i])
    }

    fn summary(&mut self) -> Value {
        json!({"requests": self.ok, "failed": self.failed, "seconds": self.elapsed.as_secs_f64(),
            "requests_per_s": self.rps(), "p50_us": self.quantile(0.5),
            "p99_us": self.quantile(0.99), "round_requests_per_s": self.round_rps})
    }
}

/// Flushes B's audit log and checks it: the chain verifies, and it holds one
/// `request` record (status 200, B's contract) per request B served.
fn check_audit(gw: &Gateway, path: &PathBuf, served: u64) -> Result<Value, String> {
    let cp = gw
        .sentinel()
        .audit()
        .flush()
        .map_err(|e| format!("flush: {e}"))?
        .ok_or("the audit log is off")?;
    let summary = kvgate_auth::audit::verify(std::slice::from_ref(path), Some(&cp), None)
        .map_err(|e| format!("audit log does not verify: {e}"))?;
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut requests = 0u64;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        if v["kind"] == "request" && v["status"] == 200 && v["contract"] == CONTRACT {
            requests += 1;
        }
    }
    let dropped = gw.sentinel().audit().dropped();
    if requests != served || dropped > 0 {
        return Err(format!(
            "audit log holds {requests} request records for {served} requests served \
             ({dropped} records dropped)"
        ));
    }
    Ok(json!({"records": summary.records, "request_records": requests, "verified": true}))
}

fn report(dir: &std::path::Path, report: &Value) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    let side = |k: &str| {
        let s = &report["gateways"][k];
        format!(
            "| {k} | {:.0} | {} | {} | {} |",
            s["requests_per_s"].as_f64().unwrap_or(0.0),
            s["requests"],
            s["p50_us"],
            s["p99_us"]
        )
    };
    let mut md = format!(
        "# Contracts overhead (auth + rate limits + audit, on vs off)\n\n\
         {} closed-loop clients, {} interleaved rounds of {} ms per gateway, round robin, \
         one instant fake engine, all in one process.{}\n\n\
         | gateway | requests/s | requests | p50 µs | p99 µs |\n|---|---|---|---|---|\n{}\n{}\n\n\
         Throughput B/A: **{:.3}x**; added p99: **{:.0} µs**.\n\n| goal | target | measured | met |\n\
         |---|---|---|---|\n",
        report["clients"],
        report["rounds"],
        report["round_ms"],
        if report["control"] == true {
            " **A/A control: B ran without contracts; the goals do not apply.**"
        } else {
            ""
        },
        side("off"),
        side("on"),
        report["throughput_ratio"].as_f64().unwrap_or(0.0),
        report["added_p99_us"].as_f64().unwrap_or(0.0),
    );
    for g in report["goals"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            g["name"].as_str().unwrap_or(""),
            g["target"].as_str().unwrap_or(""),
            g["measured"].as_str().unwrap_or(""),
            if g["met"] == true { "yes" } else { "no" }
        ));
    }
    md.push_str(&format!(
        "\nContract layer per call, no HTTP (µs): {}\n\nAudit log of B: {}\n",
        report["layer_us"], report["audit"]
    ));
    std::fs::write(dir.join("report.md"), md)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let rounds = knob("CONTRACTS_BENCH_ROUNDS", 6) as usize;
    let round = Duration::from_millis(knob("CONTRACTS_BENCH_ROUND_MS", 3000));
    let clients = knob("CONTRACTS_BENCH_CLIENTS", 16) as usize;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_path = audit_dir.path().join("audit.jsonl");
    let upstream = fake_engine().await;
    let (url_a, _gw_a) = start(config(&upstream)).await;
    let mut cfg_b = config(&upstream);
    let b_contracts = contracts(audit_dir.path());
    // The A/A control: B without contracts measures the bench's own bias.
    let control = std::env::var("CONTRACTS_BENCH_B").as_deref() == Ok("off");
    if control {
        println!("A/A control: B runs without contracts; the goals below do not apply");
    } else {
        cfg_b.contracts = b_contracts.clone();
    }
    let layer = layer_costs(&b_contracts, audit_dir.path());
    println!("contract layer per call (no HTTP): {layer}");
    let (url_b, gw_b) = start(cfg_b).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .tcp_nodelay(true)
        .build()
        .unwrap();

    // Warm both (connections, allocator, first-use paths); B's count too.
    let warm_a = phase(&client, &url_a, clients, WARMUP).await;
    let warm_b = phase(&client, &url_b, clients, WARMUP).await;
    let (mut a, mut b) = (Side::default(), Side::default());
    let (mut failed, mut b_served) = (warm_a.failed + warm_b.failed, warm_b.ok);
    for r in 0..rounds {
        // For `perf record -k CLOCK_MONOTONIC`: a round's samples are told
        // apart by these times (an Instant's Debug is its CLOCK_MONOTONIC).
        let marks = std::env::var("CONTRACTS_BENCH_MARKS").is_ok();
        if marks {
            eprintln!("mark A {:?}", Instant::now());
        }
        let pa = phase(&client, &url_a, clients, round).await;
        if marks {
            eprintln!("mark B {:?}", Instant::now());
        }
        let pb = phase(&client, &url_b, clients, round).await;
        if marks {
            eprintln!("mark end {:?}", Instant::now());
        }
        eprintln!(
            "round {}: off {:.0} req/s, on {:.0} req/s",
            r + 1,
            pa.ok as f64 / pa.elapsed.as_secs_f64(),
            pb.ok as f64 / pb.elapsed.as_secs_f64()
        );
        failed += pa.failed + pb.failed;
        b_served += pb.ok;
        a.add(pa);
        b.add(pb);
    }
    let (sa, sb) = (a.summary(), b.summary());
    let ratio = b.rps() / a.rps();
    let added_p99 = b.quantile(0.99) - a.quantile(0.99);
    println!(
        "contracts overhead: off {:.0} req/s p50 {} us p99 {} us | on {:.0} req/s p50 {} us p99 {} us",
        a.rps(),
        sa["p50_us"],
        sa["p99_us"],
        b.rps(),
        sb["p50_us"],
        sb["p99_us"]
    );
    println!("contracts overhead: throughput on/off {ratio:.3}x, added p99 {added_p99:.0} us");

    // Every record B queued is in once its responses ended; give the last
    // responses' bodies a moment to finish before flushing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gw = gw_b.clone();
    let path = audit_path.clone();
    let audit = match gw.sentinel().audit().is_enabled() {
        true => tokio::task::spawn_blocking(move || check_audit(&gw, &path, b_served))
            .await
            .unwrap(),
        false => Ok(json!({"verified": false, "off": true})),
    };
    let goals = json!([
        {"name": "throughput >= 0.95x", "target": ">= 0.95", "measured": format!("{ratio:.3}"),
            "met": ratio >= 0.95},
        {"name": "added p99 < 100 µs", "target": "< 100 µs",
            "measured": format!("{added_p99:.0} µs"), "met": added_p99 < 100.0},
    ]);
    let out = json!({
        "clients": clients, "rounds": rounds, "round_ms": round.as_millis() as u64,
        "control": control,
        "gateways": {"off": sa, "on": sb},
        "throughput_ratio": ratio, "added_p99_us": added_p99,
        "failed_requests": failed,
        "layer_us": layer,
        "audit": match &audit { Ok(v) => v.clone(), Err(e) => json!({"verified": false, "error": e}) },
        "goals": goals,
    });
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/contracts_overhead");
    if let Err(e) = report(&dir, &out) {
        eprintln!("writing the report to {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for g in goals.as_array().into_iter().flatten() {
        println!(
            "  goal {}: {} ({})",
            g["name"].as_str().unwrap_or(""),
            if g["met"] == true { "met" } else { "NOT met" },
            g["measured"].as_str().unwrap_or("")
        );
    }
    println!("report: {}", dir.join("report.md").display());
    match (&audit, failed) {
        (Ok(v), 0) => {
            println!("audit log of B verifies: {v}");
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("FAILED: {e}");
            ExitCode::FAILURE
        }
        (_, n) => {
            eprintln!("FAILED: {n} requests failed");
            ExitCode::FAILURE
        }
    }
}
