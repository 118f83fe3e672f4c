//! Idle connections to the homeserver, shared by every connection the driver serves.
//!
//! A connection is taken for one exchange and given back when its answer was read whole and
//! the homeserver keeps it open. The most recently used is taken first; one idle longer than
//! [`IDLE_FOR`] is closed instead of being reused, and at most [`MAX_IDLE`] are kept. A taken
//! connection that turns out closed (the homeserver timed it out) is retried once on a fresh
//! one (`relay`), as Pingora and nginx do.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::TcpStream;

/// At most this many idle connections are kept.
pub const MAX_IDLE: usize = 256;

/// An idle connection older than this is closed rather than reused (below the idle timeouts
/// of common servers: nginx 60 s, Go's net/http none by default).
pub const IDLE_FOR: Duration = Duration::from_secs(30);

/// The homeserver's address and idle connections.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    /// Each read from, and write to, the homeserver must finish within this.
    pub io_timeout: Duration,
    idle: Mutex<VecDeque<(TcpStream, Instant)>>,
}

impl Pool {
    /// A pool for the homeserver at `addr`.
    pub fn new(addr: SocketAddr, connect_timeout: Duration, io_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            io_timeout,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// The most recently used idle connection, if one is fresh enough.
    pub fn take(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock();
        while let Some((conn, since)) = idle.pop_back() {
            if since.elapsed() < IDLE_FOR {
                return Some(conn);
            }
        }
        None
    }

    /// Gives a connection back for reuse.
    pub fn put(&self, conn: TcpStream) {
        let mut idle = self.idle.lock();
        while idle
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= IDLE_FOR)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((conn, Instant::now()));
        }
    }

    /// A new connection.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let conn = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        conn.set_nodelay(true)?;
        Ok(conn)
    }
}
