//! The listener every HTTP surface binds. Plain: accepted sockets get
//! `TCP_NODELAY` (an SSE response's first chunk must not wait for the
//! client's delayed ACK). TLS: a background task accepts and runs each
//! handshake in its own task with a timeout, so one slow or hostile client
//! never holds up the others; only finished handshakes reach `accept`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::{ReloadingCerts, TlsConfig, TlsError};

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 1024;
/// After a failed `accept` (out of file descriptors, say): wait, then retry.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("binding {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Binds `addr`, with TLS when `tls` is set (its certificates are loaded now
/// and watched for change while the listener lives).
pub async fn bind(addr: &str, tls: Option<&TlsConfig>) -> Result<Listener, BindError> {
    let certs = tls.map(ReloadingCerts::load).transpose()?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::Io {
            addr: addr.to_string(),
            source,
        })?;
    let local = tcp.local_addr().map_err(|source| BindError::Io {
        addr: addr.to_string(),
        source,
    })?;
    let inner = match certs {
        None => Inner::Plain(tcp),
        Some(certs) => {
            let (tx, rx) = mpsc::channel(READY_QUEUE);
            Inner::Tls {
                rx,
                _tasks: Tasks(vec![
                    Some(tokio::spawn(accept_tls(tcp, certs.clone(), tx))),
                    certs.watch(),
                ]),
                certs,
            }
        }
    };
    Ok(Listener { local, inner })
}

pub struct Listener {
    local: SocketAddr,
    inner: Inner,
}

enum Inner {
    Plain(TcpListener),
    Tls {
        rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        certs: Arc<ReloadingCerts>,
        _tasks: Tasks,
    },
}

/// Background tasks that end with the listener.
struct Tasks(Vec<Option<JoinHandle<()>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.iter().flatten() {
            t.abort();
        }
    }
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The certificates in use, when this is a TLS listener.
    pub fn certs(&self) -> Option<&Arc<ReloadingCerts>> {
        match &self.inner {
            Inner::Plain(_) => None,
            Inner::Tls { certs, .. } => Some(certs),
        }
    }
}

fn nodelay(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "TCP_NODELAY not set on an accepted connection");
    }
}

async fn accept_tls(
    tcp: TcpListener,
    certs: Arc<ReloadingCerts>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        nodelay(&stream);
        let acceptor = TlsAcceptor::from(certs.current());
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, addr)).await;
                }
                Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        match &mut self.inner {
            Inner::Plain(tcp) => loop {
                match TcpListener::accept(tcp).await {
                    Ok((s, addr)) => {
                        nodelay(&s);
                        return (Stream::Plain(s), addr);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            },
            Inner::Tls { rx, .. } => match rx.recv().await {
                Some((s, addr)) => (Stream::Tls(Box::new(s)), addr),
                // The accept task ends only with the listener.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// An accepted connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// SHA-256 of the client certificate's DER, if the client sent one (it
    /// was verified against the client CA in the handshake).
    pub fn client_cert_sha256(&self) -> Option<[u8; 32]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => {
                let cert = s.get_ref().1.peer_certificates()?.first()?;
                Some(Sha256::digest(cert.as_ref()).into())
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Who is on the other end of a request's connection (axum connect info:
/// serve with `into_make_service_with_connect_info::<Peer>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// See [`Stream::client_cert_sha256`].
    pub client_cert_sha256: Option<[u8; 32]>,
}

impl Connected<IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        Self {
            addr: *stream.remote_addr(),
            client_cert_sha256: stream.io().client_cert_sha256(),
        }
    }
}

/// A handler argument: the request's verified client certificate (the
/// SHA-256 of its DER), read from the connection's [`Peer`]. None without a
/// certificate, or when the router is served without connect info.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCert(pub Option<[u8; 32]>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientCert {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientCert(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<Peer>>()
                .and_then(|c| c.0.client_cert_sha256),
        ))
    }
}
