//! upstream_peer: the one homeserver, resolved once at start-up.

use std::net::{SocketAddr, ToSocketAddrs};

use pingora::upstreams::peer::HttpPeer;

use crate::config::Homeserver;

/// How to reach the homeserver.
#[derive(Debug, Clone)]
pub struct Upstream {
    addr: SocketAddr,
    tls: bool,
    sni: String,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
}

impl Upstream {
    /// Resolves the homeserver's host (once: restart the gateway if its address changes).
    pub fn resolve(hs: &Homeserver) -> std::io::Result<Self> {
        let addr = (hs.host.as_str(), hs.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{} has no address", hs.host)))?;
        Ok(Self {
            addr,
            tls: hs.tls,
            sni: hs.host.clone(),
            connect_timeout: hs.connect_timeout,
            read_timeout: hs.read_timeout,
        })
    }

    /// The homeserver's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the homeserver is reached over TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// How long a connection may take to open.
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.connect_timeout
    }

    /// How long each read or write may take.
    pub fn read_timeout(&self) -> std::time::Duration {
        self.read_timeout
    }

    /// A peer for one request; connections are pooled and reused by Pingora.
    pub fn peer(&self) -> HttpPeer {
        let mut peer = HttpPeer::new(self.addr, self.tls, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer
    }
}
