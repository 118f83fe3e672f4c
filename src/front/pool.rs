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

    /// The most recently used idle connection that is fresh enough and still clean: the
    /// homeserver has neither closed it nor sent anything on it since its last answer (stray
    /// bytes would be read as the next request's answer, which may be another client's).
    pub fn take(&self) -> Option<TcpStream> {
        loop {
            let (conn, since) = self.idle.lock().pop_back()?;
            if since.elapsed() < IDLE_FOR && clean(&conn) {
                return Some(conn);
            }
        }
    }

    /// Closes the idle connections that are too old or no longer clean (run every 30 s, so
    /// that connections the homeserver closed do not linger after traffic stopped).
    pub fn sweep(&self) {
        self.idle
            .lock()
            .retain(|(conn, since)| since.elapsed() < IDLE_FOR && clean(conn));
    }

    /// Gives a connection back for reuse.
    pub fn put(&self, conn: TcpStream) {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while idle
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= IDLE_FOR)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((conn, now));
        }
    }

    /// A new connection.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let conn = super::deadline::within(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        conn.set_nodelay(true)?;
        Ok(conn)
    }
}

/// Whether an idle connection has nothing to read and is open: a non-blocking `MSG_PEEK`
/// system call, so that it sees what the kernel holds now. Not the event loop's readiness
/// (tokio's `try_read`, `poll_read_ready`): it lags behind the kernel until the event loop
/// next polls, which under load is milliseconds (nginx and Pingora check that way, and have
/// that window), and `poll_read_ready` answers `Pending` whenever the task's cooperative
/// budget is spent, whatever the socket holds. A readiness-first variant was measured and
/// dropped for those reasons (bench/README.md, "The pool's check"). Bytes that arrive after
/// this check and before the next answer are not caught: a homeserver that sends them is
/// broken.
fn clean(conn: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(conn).peek(&mut probe) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
        Ok(0) => false,
        Ok(_) => {
            tracing::warn!("the homeserver sent data on an idle connection; it is closed");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (conn, server)
    }

    /// Long enough for the event loop to have seen what the peer did.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_quiet_connection_is_clean() {
        let (conn, _server) = pair().await;
        settle().await;
        assert!(clean(&conn));
    }

    #[tokio::test]
    async fn bytes_or_a_close_after_the_answer_make_it_unclean() {
        let (mut conn, mut server) = pair().await;
        // An answer read whole (a short read clears the readiness), then stray bytes.
        server.write_all(b"answer").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 6);
        settle().await;
        assert!(clean(&conn), "nothing arrived after the answer");
        server.write_all(b"stray").await.unwrap();
        settle().await;
        assert!(!clean(&conn), "stray bytes were not seen");

        let (conn, server) = pair().await;
        drop(server);
        settle().await;
        assert!(!clean(&conn), "a closed connection was taken as clean");
    }

    #[tokio::test]
    async fn bytes_the_event_loop_has_not_seen_yet_make_it_unclean() {
        let (mut conn, server) = pair().await;
        server.try_write(b"answer").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 6);
        // Stray bytes arrive while the event loop is busy (no `.await` from here on): only
        // the kernel knows of them.
        server.try_write(b"stray").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !clean(&conn),
            "stray bytes the event loop had not seen were missed"
        );
    }

    #[tokio::test]
    async fn readiness_left_over_from_a_full_read_is_checked_with_the_kernel() {
        let (mut conn, mut server) = pair().await;
        server.write_all(b"12345678").await.unwrap();
        settle().await;
        // A read that fills its buffer leaves the readiness set although nothing is left.
        let mut buf = [0u8; 8];
        conn.read_exact(&mut buf).await.unwrap();
        assert!(clean(&conn));
        server.write_all(b"9").await.unwrap();
        settle().await;
        assert!(!clean(&conn));
    }
}
