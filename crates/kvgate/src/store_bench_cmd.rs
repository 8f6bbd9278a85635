//! `kvgate bench store`: `lm://` PUT and GET MiB/s, side by side in one run,
//! for `kvgate store`'s memory tier, its disk tier (every chunk sealed with
//! AES-256-GCM, read back after a restart so every GET comes from disk),
//! LMCache's own server (`--lmcache-cmd`), and the loopback copy limit; for
//! each chunk size and connection count; with each store's peak RSS, a
//! report, plots and the goals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvgate_bench::compare::Goal;
use kvgate_bench::plot::{line_chart, Series, YScale};
use kvgate_bench::store::{self as load, Shape, Throughput};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct StoreBenchArgs {
    /// Chunk sizes, bytes: LMCache's 256-token chunk of the tiny test model
    /// (128 KiB) and of Llama-3-8B (32 MiB).
    #[arg(long, value_delimiter = ',', default_value = "131072,33554432")]
    pub sizes: Vec<u32>,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub connections: Vec<usize>,
    /// Bytes each measurement writes and reads back.
    #[arg(long, default_value_t = 256 << 20)]
    pub bytes: u64,
    /// LMCache's server, `{port}` standing for its port (e.g.
    /// `python -m lmcache.v1.server 127.0.0.1 {port} cpu`); unset: left out.
    #[arg(long)]
    pub lmcache_cmd: Option<String>,
    /// Where the stores keep their config and disk tier.
    #[arg(long, default_value = "target/bench-store")]
    pub work: PathBuf,
    /// report.json, report.md and the plots.
    #[arg(long, default_value = "docs/benchmarks/store")]
    pub out: PathBuf,
    /// Serve only the loopback limit on this address (how the bench starts
    /// it in a process of its own).
    #[arg(long, hide = true)]
    pub serve_loopback: Option<std::net::SocketAddr>,
}

/// A memory-tier store's bound beyond which its RSS is over budget: its
/// allocator, runtime and one chunk being read per connection.
const RSS_OVERHEAD: u64 = 64 << 20;

#[derive(Debug, Serialize)]
struct Sample {
    target: &'static str,
    chunk_bytes: u32,
    connections: usize,
    put: Throughput,
    get: Throughput,
}

#[derive(Debug, Serialize)]
struct StoreReport {
    bytes_per_measurement: u64,
    samples: Vec<Sample>,
    /// Peak RSS per server process, bytes.
    peak_rss: Vec<(String, u64)>,
    memory_tier_bytes: u64,
    goals: Vec<Goal>,
}

/// A child process, killed when dropped.
struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_answering(mut server: Server, what: &str, within: Duration) -> Result<Server> {
    let t = Instant::now();
    while !load::answers(server.addr).await {
        if let Some(status) = server.child.try_wait()? {
            bail!("{what} exited before it answered: {status}");
        }
        if t.elapsed() > within {
            bail!("{what} did not answer on {} within {within:?}", server.addr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(server)
}

/// `kvgate store` with `cfg` (written to `work`), as a child process.
async fn kvgate_store(cfg: &kvgate_store::StoreConfig, work: &Path, name: &str) -> Result<Server> {
    let path = work.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(cfg)?)?;
    let child = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "store", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .context("starting kvgate store")?;
    let addr = cfg.listen.parse()?;
    wait_answering(Server { child, addr }, name, Duration::from_secs(20)).await
}

fn config(
    work: &Path,
    memory_bytes: u64,
    max_chunk_bytes: u32,
    disk: bool,
) -> Result<kvgate_store::StoreConfig> {
    let mut cfg = kvgate_store::StoreConfig {
        listen: format!("127.0.0.1:{}", free_port()?),
        admin_listen: format!("127.0.0.1:{}", free_port()?),
        memory_bytes,
        max_chunk_bytes,
        ..Default::default()
    };
    if disk {
        // The disk tier needs a contract: a listener bound to one takes
        // LMCache's untagged keys as its own (the sidecar layout).
        let master = work.join("master.key");
        std::fs::write(
            &master,
            "kvgate bench store: key material for the bench contract",
        )?;
        cfg.contracts = kvgate_auth::AuthConfig::for_api_keys(
            &[("bench", "bench")],
            kvgate_auth::KeyRef::File(master),
        );
        let bound = format!("127.0.0.1:{}", free_port()?);
        cfg.contract_listeners = vec![kvgate_store::config::ContractListener {
            listen: bound,
            contract: "bench".into(),
        }];
        cfg.disk = Some(kvgate_store::config::DiskConfig {
            dir: work.join("disk"),
            max_bytes: 8 << 30,
            write: kvgate_store::WritePolicy::Through,
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Writes `bytes` of chunks nobody reads (1 MiB, or `chunk` if smaller): a server starts full, as a
/// cache in service is, so measured PUTs reuse evicted memory instead of
/// faulting fresh pages in (which on this VM costs more than the copy).
async fn warm(addr: std::net::SocketAddr, bytes: u64, chunk: u32, what: &str) -> Result<()> {
    let shape = Shape::new(chunk.min(1 << 20), 1, bytes, WARM_RUN);
    load::put_phase(load::connect(addr, &shape).await?, shape)
        .await
        .with_context(|| format!("warming {what}"))?;
    Ok(())
}

/// The warm-up's keys, apart from every measurement's.
const WARM_RUN: u64 = 0xffff;

async fn measure(
    addr: std::net::SocketAddr,
    shape: Shape,
    verify: bool,
) -> Result<(Throughput, Throughput)> {
    eprintln!(
        "  {addr}: {} x {} B on {} connection(s)",
        shape.chunks_per_connection * shape.connections,
        shape.chunk_bytes,
        shape.connections
    );
    let conns = load::connect(addr, &shape).await?;
    let (conns, put) = load::put_phase(conns, shape).await?;
    let get = load::get_phase(conns, shape, verify).await?;
    Ok((put, get))
}

pub async fn run(args: StoreBenchArgs) -> Result<()> {
    if let Some(addr) = args.serve_loopback {
        load::spawn_loopback(addr)?;
        return std::future::pending().await;
    }
    std::fs::create_dir_all(&args.work)?;
    std::fs::create_dir_all(&args.out)?;
    let shapes: Vec<(u32, usize)> = args
        .sizes
        .iter()
        .flat_map(|s| args.connections.iter().map(move |c| (*s, *c)))
        .collect();
    let largest = args.sizes.iter().copied().max().unwrap_or(1);
    // Room for every measurement's chunks: none is evicted before it is read.
    let written: u64 = shapes
        .iter()
        .map(|(size, conns)| Shape::new(*size, *conns, args.bytes, 0).bytes())
        .sum();
    let memory_bytes = written + 2 * u64::from(largest);
    let mut samples = Vec::new();
    let mut peak_rss = Vec::new();
    let mut run_id = 0u64;
    let mut next_shape = |size, conns| {
        run_id += 1;
        Shape::new(size, conns, args.bytes, run_id)
    };

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let child = Command::new(std::env::current_exe()?)
        .args(["bench", "store", "--serve-loopback"])
        .arg(addr.to_string())
        .spawn()
        .context("starting the loopback server")?;
    let loopback =
        wait_answering(Server { child, addr }, "loopback", Duration::from_secs(20)).await?;
    warm(loopback.addr, memory_bytes, largest, "loopback").await?;
    for &(size, conns) in &shapes {
        let (put, get) = measure(loopback.addr, next_shape(size, conns), false)
            .await
            .context("loopback")?;
        samples.push(sample("loopback", size, conns, put, get));
    }
    drop(loopback);

    let cfg = config(&args.work, memory_bytes, largest, false)?;
    let memory = kvgate_store(&cfg, &args.work, "kvgate-memory").await?;
    warm(
        memory.addr,
        memory_bytes,
        largest,
        "kvgate store, memory tier",
    )
    .await?;
    for &(size, conns) in &shapes {
        let (put, get) = measure(memory.addr, next_shape(size, conns), true)
            .await
            .context("kvgate store, memory tier")?;
        samples.push(sample("kvgate-memory", size, conns, put, get));
    }
    peak_rss.push((
        "kvgate-memory".to_string(),
        load::peak_rss(memory.child.id()).unwrap_or(0),
    ));
    drop(memory);

    // Disk: PUTs sealed to disk as they come; a restart empties memory, so
    // every GET reads a file, opens its frame and promotes it.
    let _ = std::fs::remove_dir_all(args.work.join("disk"));
    let disk_memory = (2 * u64::from(largest)).max(64 << 20);
    let cfg = config(&args.work, disk_memory, largest, true)?;
    let addr = bound_addr(&cfg)?;
    let mut warmed = false;
    for &(size, conns) in &shapes {
        let shape = next_shape(size, conns);
        let store = kvgate_store(&cfg, &args.work, "kvgate-disk").await?;
        if !warmed {
            // Its memory tier only: the disk's page cache is not pre-filled.
            warm(addr, disk_memory, largest, "kvgate store, disk tier").await?;
            warmed = true;
        }
        let (_, put) = load::put_phase(load::connect(addr, &shape).await?, shape)
            .await
            .context("kvgate store, disk tier (PUT)")?;
        drop(store);
        let store = kvgate_store(&cfg, &args.work, "kvgate-disk").await?;
        let get = load::get_phase(load::connect(addr, &shape).await?, shape, true)
            .await
            .context("kvgate store, disk tier (GET after a restart)")?;
        peak_rss.push((
            format!("kvgate-disk {size} B x{conns}"),
            load::peak_rss(store.child.id()).unwrap_or(0),
        ));
        samples.push(sample("kvgate-disk", size, conns, put, get));
    }

    if let Some(cmd) = &args.lmcache_cmd {
        let port = free_port()?;
        // `exec`: the server is the child itself, so dropping it stops the
        // server (not only the shell, which left it running).
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {}", cmd.replace("{port}", &port.to_string())))
            .stdout(Stdio::null())
            .spawn()
            .context("starting LMCache's server")?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let lmcache = wait_answering(
            Server { child, addr },
            "LMCache's server",
            Duration::from_secs(180),
        )
        .await?;
        warm(lmcache.addr, memory_bytes, largest, "LMCache's server").await?;
        for &(size, conns) in &shapes {
            let (put, get) = measure(lmcache.addr, next_shape(size, conns), true)
                .await
                .context("LMCache's server")?;
            samples.push(sample("lmcache", size, conns, put, get));
        }
        // The shell's child is the server: its RSS is the python's.
        peak_rss.push(("lmcache".to_string(), children_peak_rss(lmcache.child.id())));
    }

    let goals = goals(
        &samples,
        &peak_rss,
        memory_bytes,
        largest,
        &args.connections,
    );
    let report = StoreReport {
        bytes_per_measurement: args.bytes,
        samples,
        peak_rss,
        memory_tier_bytes: memory_bytes,
        goals,
    };
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let plots = plots(&report, &args.out)?;
    std::fs::write(args.out.join("report.md"), markdown(&report, &plots))?;
    println!("{}", table(&report));
    Ok(())
}

fn bound_addr(cfg: &kvgate_store::StoreConfig) -> Result<std::net::SocketAddr> {
    let l = cfg
        .contract_listeners
        .first()
        .context("no bound listener")?;
    Ok(l.listen.parse()?)
}

fn sample(
    target: &'static str,
    chunk_bytes: u32,
    connections: usize,
    put: Throughput,
    get: Throughput,
) -> Sample {
    Sample {
        target,
        chunk_bytes,
        connections,
        put,
        get,
    }
}

/// The largest peak RSS among `pid`'s children (`sh -c` runs the server).
fn children_peak_rss(pid: u32) -> u64 {
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut best = load::peak_rss(pid).unwrap_or(0);
    for k in kids
        .split_whitespace()
        .filter_map(|k| k.parse::<u32>().ok())
    {
        best = best.max(load::peak_rss(k).unwrap_or(0));
    }
    best
}

/// min over every (size, connections, op) of `a`'s MiB/s over `b`'s.
fn min_ratio(samples: &[Sample], a: &str, b: &str) -> Option<f64> {
    let mut out: Option<f64> = None;
    for x in samples.iter().filter(|s| s.target == a) {
        let Some(y) = samples.iter().find(|s| {
            s.target == b && s.chunk_bytes == x.chunk_bytes && s.connections == x.connections
        }) else {
            continue;
        };
        for r in [x.put.mib_s / y.put.mib_s, x.get.mib_s / y.get.mib_s] {
            out = Some(out.map_or(r, |o: f64| o.min(r)));
        }
    }
    out
}

fn goals(
    samples: &[Sample],
    rss: &[(String, u64)],
    memory: u64,
    largest: u32,
    conns: &[usize],
) -> Vec<Goal> {
    let ratio_goal = |what: &str, a: &str, b: &str, target: f64| {
        let r = min_ratio(samples, a, b);
        Goal {
            what: what.into(),
            target: format!(">= {target:.1}x"),
            measured: r.map_or("not measured".into(), |r| {
                format!("{r:.2}x (lowest over sizes, connections, PUT and GET)")
            }),
            met: r.map(|r| r >= target),
        }
    };
    let budget = memory
        + RSS_OVERHEAD
        + u64::from(largest) * conns.iter().copied().max().unwrap_or(1) as u64;
    let mem_rss = rss
        .iter()
        .find(|(n, _)| n == "kvgate-memory")
        .map(|(_, b)| *b);
    vec![
        ratio_goal(
            "kvgate disk tier (AES-256-GCM) vs LMCache's server",
            "kvgate-disk",
            "lmcache",
            3.0,
        ),
        ratio_goal(
            "kvgate memory tier vs the loopback copy limit",
            "kvgate-memory",
            "loopback",
            0.5,
        ),
        Goal {
            what: "kvgate memory-tier store's peak RSS within the tier + overhead".into(),
            target: format!(
                "<= {} MiB (tier + 64 MiB + one chunk per connection)",
                budget >> 20
            ),
            measured: mem_rss.map_or("not measured".into(), |b| format!("{} MiB", b >> 20)),
            met: mem_rss.map(|b| b <= budget),
        },
    ]
}

fn table(r: &StoreReport) -> String {
    let mut t = String::from(
        "| target | chunk | connections | PUT MiB/s | GET MiB/s |\n|---|---:|---:|---:|---:|\n",
    );
    for s in &r.samples {
        t.push_str(&format!(
            "| {} | {} KiB | {} | {:.0} | {:.0} |\n",
            s.target,
            s.chunk_bytes >> 10,
            s.connections,
            s.put.mib_s,
            s.get.mib_s
        ));
    }
    t
}

fn markdown(r: &StoreReport, plots: &[String]) -> String {
    let mut md = String::from("# `kvgate bench store`\n\n");
    md.push_str(&format!(
        "`lm://` PUT and GET throughput, one run, side by side: each measurement writes about {} MiB as LMCache's \
         connector does (PUTs back to back, no reply) and reads it back (one GET per chunk). `loopback` stores \
         nothing (the socket path's limit here); `kvgate-disk` seals every chunk with AES-256-GCM and is restarted \
         between PUT and GET, so every GET reads and opens a file; `lmcache` is LMCache's own server. Command: \
         `scripts/bench/store.sh`.\n\n",
        r.bytes_per_measurement >> 20
    ));
    md.push_str(&table(r));
    md.push_str("\n## Peak RSS\n\n| process | MiB |\n|---|---:|\n");
    for (n, b) in &r.peak_rss {
        md.push_str(&format!("| {n} | {} |\n", b >> 20));
    }
    md.push_str(&format!("\nMemory tier bound: {} MiB.\n\n## Goals\n\n| goal | target | measured | met |\n|---|---|---|---|\n", r.memory_tier_bytes >> 20));
    for g in &r.goals {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        md.push_str(&format!(
            "| {} | {} | {} | {met} |\n",
            g.what, g.target, g.measured
        ));
    }
    md.push('\n');
    for p in plots {
        md.push_str(&format!("![{p}]({p})\n"));
    }
    md
}

/// One plot per chunk size: MiB/s against connections, a line per target
/// and operation.
fn plots(r: &StoreReport, dir: &Path) -> Result<Vec<String>> {
    let mut sizes: Vec<u32> = r.samples.iter().map(|s| s.chunk_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut out = Vec::new();
    for size in sizes {
        let mut series = Vec::new();
        for target in ["loopback", "kvgate-memory", "kvgate-disk", "lmcache"] {
            for (op, pick) in [("PUT", true), ("GET", false)] {
                let points: Vec<(f64, f64)> = r
                    .samples
                    .iter()
                    .filter(|s| s.target == target && s.chunk_bytes == size)
                    .map(|s| {
                        (
                            s.connections as f64,
                            if pick { s.put.mib_s } else { s.get.mib_s },
                        )
                    })
                    .collect();
                if !points.is_empty() {
                    series.push(Series {
                        name: format!("{target} {op}"),
                        points,
                    });
                }
            }
        }
        let name = format!("throughput-{}k.svg", size >> 10);
        line_chart(
            &dir.join(&name),
            &format!("lm:// throughput, {} KiB chunks", size >> 10),
            "connections",
            "MiB/s",
            &series,
            YScale::Linear,
        )?;
        out.push(name);
    }
    Ok(out)
}
