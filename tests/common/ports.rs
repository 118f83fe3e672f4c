//! Ports for the test servers, without the bind-then-drop race of asking the OS for an
//! ephemeral port: the OS hands ephemeral ports (32768–60999 on Linux) to outgoing connections
//! too, so a port "free" a moment ago could be taken by any client before the server binds it.
//! These come from 20000–31999, below that range, each handed out once per test process (a
//! counter from a per-process offset), and are checked free before use.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20_000;
const SPAN: u32 = 12_000;

/// A port no other test of this process was given, nobody listens on, and no outgoing
/// connection will be assigned.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}
