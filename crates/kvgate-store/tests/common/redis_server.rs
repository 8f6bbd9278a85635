//! Real Redis servers for the tests: one, or a three-node cluster, each a
//! `redis-server` process on loopback with nothing saved, killed on drop.
//! `scripts/test` installs `redis-server` where it is missing
//! (`KVGATE_REDIS_SERVER` names another binary, e.g. `valkey-server`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
}

fn binary() -> String {
    std::env::var("KVGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A port free for Redis and, for a cluster node, for its bus (port + 10000).
fn free_port(taken: &[u16]) -> u16 {
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

fn spawn(dir: &Path, port: u16, cluster: bool) -> Child {
    let mut cmd = Command::new(binary());
    cmd.current_dir(dir)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        // A dump shows values as they are (a test reads it for plaintext).
        .args(["--rdbcompression", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if cluster {
        cmd.args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
    }
    cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e} (install it: apt-get install redis-server, or run ./scripts/test)",
            binary()
        )
    })
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
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(&[]);
        let child = spawn(dir.path(), port, false);
        wait_for(port);
        Self {
            children: vec![child],
            ports: vec![port],
            dir,
        }
    }

    /// Three masters sharing the 16384 slots, no replicas.
    pub fn cluster() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let p = free_port(&ports);
            ports.push(p);
        }
        let children = ports.iter().map(|p| spawn(dir.path(), *p, true)).collect();
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
