//! What the binary's tests share: loopback servers, a child process that is
//! killed when dropped, and waiting for readiness.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use axum::Router;

pub async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

/// A `kvgate` child process, killed when dropped.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client that opens a fresh connection per request: no keep-alive race
/// with a server that is starting or stopping.
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Waits until `{url}/ready` answers 200.
pub async fn wait_ready(client: &reqwest::Client, url: &str) {
    let t = Instant::now();
    while !client
        .get(format!("{url}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{url} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
