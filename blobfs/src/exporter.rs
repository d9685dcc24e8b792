//! A Prometheus endpoint for a mount's [`crate::Metrics`]: `GET /metrics`
//! on a loopback address, served by one thread (`tiny_http` does the HTTP).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::fs::{BlobFs, FsInner};

/// A running metrics endpoint ([`BlobFs::serve_metrics`]); stops when
/// dropped. It does not keep the file system mounted (after an unmount it
/// answers 503), but a scrape holds it for its duration: drop the server
/// before [`BlobFs::unmount`], which fails as busy while anything holds the
/// file system.
pub struct MetricsServer {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on (with the port the system chose, when
    /// asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetricsServer({})", self.addr)
    }
}

/// The loopback socket address `addr` names (`127.0.0.1:9100`,
/// `[::1]:9100`, `localhost:9100`), or why not.
fn loopback(addr: &str) -> Result<SocketAddr> {
    let bad = |why: String| Error::InvalidArgument(format!("metrics address {addr:?}: {why}"));
    let mut all = addr
        .to_socket_addrs()
        .map_err(|e| bad(format!("{e} (expected HOST:PORT on the loopback address)")))?;
    let a = all.find(|a| a.ip().is_loopback()).ok_or_else(|| {
        bad("not a loopback address: metrics are served on 127.0.0.1 or ::1 only".into())
    })?;
    Ok(a)
}

impl BlobFs {
    /// Serves [`BlobFs::metrics`] in Prometheus' text format at
    /// `http://ADDR/metrics`, from a thread of its own, until the returned
    /// server is dropped. `addr` must be on the loopback address (e.g.
    /// `127.0.0.1:9100`; port 0 picks a free one, see
    /// [`MetricsServer::addr`]): the figures are for a scraper on the same
    /// machine, not the network.
    pub fn serve_metrics(&self, addr: &str) -> Result<MetricsServer> {
        let at = loopback(addr)?;
        let server = tiny_http::Server::http(at)
            .map_err(|e| Error::InvalidArgument(format!("cannot serve metrics on {at}: {e}")))?;
        let addr = server.server_addr().to_ip().ok_or_else(|| {
            Error::InvalidArgument(format!("metrics server on {at}: no IP address"))
        })?;
        let server = Arc::new(server);
        let fs = self.downgrade();
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("blobfs-metrics".into())
            .spawn(move || serve(&s, &fs))
            .map_err(|e| Error::InvalidArgument(format!("metrics thread: {e}")))?;
        tracing::info!(%addr, "serving BlobFS metrics at /metrics");
        Ok(MetricsServer {
            addr,
            server,
            thread: Some(thread),
        })
    }
}

fn serve(server: &tiny_http::Server, fs: &Weak<FsInner>) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or_default();
        let (code, body) = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => match fs.upgrade() {
                Some(inner) => (200, BlobFs::from_inner(inner).metrics().to_prometheus()),
                None => (503, "the file system is unmounted\n".to_string()),
            },
            (tiny_http::Method::Get, _) => (404, "not found: try /metrics\n".to_string()),
            _ => (405, "only GET\n".to_string()),
        };
        let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
        if let Ok(h) = tiny_http::Header::from_bytes(
            &b"Content-Type"[..],
            &b"text/plain; version=0.0.4; charset=utf-8"[..],
        ) {
            resp.add_header(h);
        }
        let _ = req.respond(resp);
    }
}
