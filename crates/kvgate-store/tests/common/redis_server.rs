//! Real Redis servers for the tests: one, or a three-node cluster, each a
//! `redis-server` (or `valkey-server`) process on loopback with nothing
//! saved, killed on drop; one may serve TLS only (`rediss://`).
//! `scripts/test` installs `redis-server` where it is missing
//! (`KVGATE_REDIS_SERVER` names another binary) and a Valkey
//! (`KVGATE_VALKEY_SERVER`; else `valkey-server` on PATH). The tier's tests
//! run on both: [`on_redis_and_valkey!`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server program the tests run.
#[derive(Debug, Clone)]
pub struct Server {
    pub binary: String,
}

impl Server {
    /// `redis-server`, or what `KVGATE_REDIS_SERVER` names.
    pub fn redis() -> Self {
        Self {
            binary: std::env::var("KVGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()),
        }
    }

    /// The Valkey `KVGATE_VALKEY_SERVER` names (it must run), else a
    /// `valkey-server` on PATH; None: no Valkey installed here.
    pub fn valkey() -> Option<Self> {
        if let Ok(binary) = std::env::var("KVGATE_VALKEY_SERVER") {
            return Some(Self { binary });
        }
        let runs = Command::new("valkey-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        runs.then(|| Self {
            binary: "valkey-server".into(),
        })
    }

    /// What `--version` prints (e.g. `Valkey server v=9.1.2 ...`).
    pub fn version(&self) -> String {
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Runs each named `async fn(Server)` as two tests, `<name>::redis` and
/// `<name>::valkey`; the second says it was skipped where no Valkey is
/// installed (`scripts/test` installs one).
#[macro_export]
macro_rules! on_redis_and_valkey {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::common::redis_server::Server;

            #[tokio::test]
            async fn redis() {
                super::$name(Server::redis()).await
            }

            #[tokio::test]
            async fn valkey() {
                match Server::valkey() {
                    Some(s) => {
                        assert!(s.version().contains("Valkey"), "{} is not Valkey: {}", s.binary, s.version());
                        super::$name(s).await
                    }
                    None => eprintln!(
                        "skipped: no Valkey here (KVGATE_VALKEY_SERVER unset, no valkey-server on PATH; scripts/test installs one)"
                    ),
                }
            }
        }
    )*};
}

/// The certificates a TLS server presents and checks (PEM files).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub struct RedisServer {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
}

/// A port free for Redis and, for a cluster node, for its bus (port + 10000).
pub fn free_port(taken: &[u16]) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55000
            && !taken.contains(&p)
            && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        {
            return p;
        }
    }
}

fn command(server: &Server, dir: &Path) -> Command {
    let mut cmd = Command::new(&server.binary);
    cmd.current_dir(dir)
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        // A dump shows values as they are (a test reads it for plaintext).
        .args(["--rdbcompression", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn run(server: &Server, mut cmd: Command) -> Child {
    cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e} (install it: apt-get install redis-server, or run ./scripts/test)",
            server.binary
        )
    })
}

fn spawn(server: &Server, dir: &Path, port: u16, cluster: bool) -> Child {
    let mut cmd = command(server, dir);
    cmd.args(["--port", &port.to_string()]);
    if cluster {
        cmd.args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
    }
    run(server, cmd)
}

fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        if pong.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "redis on {port} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl RedisServer {
    pub fn start(server: &Server) -> Self {
        Self::start_on(server, free_port(&[]))
    }

    /// One server on `port` (e.g. one a store was told of before it ran).
    pub fn start_on(server: &Server, port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn(server, dir.path(), port, false);
        wait_for(port);
        Self {
            children: vec![child],
            ports: vec![port],
            dir,
        }
    }

    /// TLS only (`--port 0`), presenting `tls.cert`; with `client_certs`
    /// a client must present one `tls.ca` signed (mTLS).
    pub fn start_tls(server: &Server, tls: &TlsFiles, client_certs: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(&[]);
        let mut cmd = command(server, dir.path());
        cmd.args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&tls.cert)
            .arg("--tls-key-file")
            .arg(&tls.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca)
            .args([
                "--tls-auth-clients",
                if client_certs { "yes" } else { "no" },
            ]);
        let mut child = run(server, cmd);
        // Up once it accepts connections (a PING would need the client's
        // TLS, which is what the tests are about).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{} exited at start ({status}): built without TLS?",
                    server.binary
                );
            }
            assert!(
                Instant::now() < deadline,
                "TLS redis on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            children: vec![child],
            ports: vec![port],
            dir,
        }
    }

    /// Three masters sharing the 16384 slots, no replicas.
    pub fn cluster(server: &Server) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let p = free_port(&ports);
            ports.push(p);
        }
        let children = ports
            .iter()
            .map(|p| spawn(server, dir.path(), *p, true))
            .collect();
        for p in &ports {
            wait_for(*p);
        }
        let me = Self {
            children,
            ports,
            dir,
        };
        // Slots by hand (what `redis-cli --cluster create` does): each node
        // takes a third, then they meet.
        let per = 16384 / 3;
        for (i, p) in me.ports.iter().enumerate() {
            let (lo, hi) = (i * per, if i == 2 { 16383 } else { (i + 1) * per - 1 });
            let mut c = me.connection(*p);
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(lo)
                .arg(hi)
                .query::<()>(&mut c)
                .unwrap();
        }
        for p in &me.ports[1..] {
            let mut c = me.connection(me.ports[0]);
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(*p)
                .query::<()>(&mut c)
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.ports.iter().all(|p| {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut me.connection(*p))
                .unwrap_or_default();
            info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
        }) {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// The `rediss://` URL of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.ports[0])
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A plain connection to one node.
    pub fn connection(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Every key on every node, with its value (`DUMP` would be opaque:
    /// `GET` for strings, members for sets, fields and values for hashes).
    pub fn contents(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for p in &self.ports {
            let mut c = self.connection(*p);
            let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
            for k in keys {
                let kind: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
                let value: Vec<u8> = match kind.as_str() {
                    "string" => redis::cmd("GET").arg(&k).query(&mut c).unwrap(),
                    "set" => redis::cmd("SMEMBERS")
                        .arg(&k)
                        .query::<Vec<Vec<u8>>>(&mut c)
                        .unwrap()
                        .concat(),
                    "hash" => redis::cmd("HGETALL")
                        .arg(&k)
                        .query::<Vec<Vec<u8>>>(&mut c)
                        .unwrap()
                        .concat(),
                    other => panic!("unexpected {other} at {k}"),
                };
                out.push((k, value));
            }
        }
        out
    }

    /// The first node's dump, as `SAVE` writes it to disk.
    pub fn dump(&self) -> Vec<u8> {
        redis::cmd("SAVE")
            .query::<()>(&mut self.connection(self.ports[0]))
            .unwrap();
        std::fs::read(self.dir.path().join("dump.rdb")).unwrap()
    }

    /// Keys on one node.
    pub fn dbsize(&self, port: u16) -> usize {
        redis::cmd("DBSIZE")
            .query(&mut self.connection(port))
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
