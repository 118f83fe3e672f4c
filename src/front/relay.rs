//! One exchange with the homeserver: the prepared head goes out on a pooled connection, the
//! answer comes back head first (checked for a lost binding, as `rewrite` does on Pingora's
//! path), then its body, passed through as the homeserver framed it (`Content-Length`,
//! chunked, or until the homeserver closes). Nothing is buffered beyond one read.

use std::io;

use bytes::{BufMut, BytesMut};
use http::HeaderValue;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::deadline::within;
use super::pool::Pool;
use crate::error::GatewayError;
use crate::gateway::ctx::Ctx;
use crate::gateway::headers::Relayed;
use crate::gateway::{respond, rewrite, Gateway};

/// The largest response head read from the homeserver.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 256;
const READ_CHUNK: usize = 16 * 1024;

/// How an exchange ended.
#[derive(Debug)]
pub struct Done {
    /// The status the client got (0: none was written).
    pub status: u16,
    /// The client connection can take the next request.
    pub keep_alive: bool,
    /// Proxying failed after admission (for the access log).
    pub failed: bool,
}

/// What the client is told and how the connection goes on.
pub struct Answer<'a> {
    /// The request ID echoed in the response.
    pub request_id: Option<&'a HeaderValue>,
    /// A `HEAD` request: the head only.
    pub head_only: bool,
    /// Close the client connection after this response.
    pub close: bool,
}

/// Relays `req` (already prepared for the homeserver) and its answer.
pub async fn exchange(
    gw: &Gateway,
    pool: &Pool,
    down: &mut Stream,
    req: &Relayed<'_>,
    ctx: &mut Ctx,
    answer: &Answer<'_>,
) -> Done {
    let mut out = Vec::with_capacity(1024);
    req.write_h1(&mut out);
    ctx.upstream_started = Some(std::time::Instant::now());
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let (mut up, head) = match send(pool, &out, &mut rbuf).await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::warn!(error = %e, "homeserver exchange failed");
            return refuse(gw, down, ctx, GatewayError::UpstreamUnavailable, answer).await;
        }
    };
    if let Some(err) = rewrite::binding_lost(gw, head.status, ctx).await {
        // The homeserver's body is not read: its connection is closed, not reused.
        return refuse(gw, down, ctx, err, answer).await;
    }
    let bodiless = answer.head_only || matches!(head.status, 204 | 304);
    // An answer without a body that announced one (a length, chunks): the homeserver may yet
    // send those bytes, so its connection is not reused.
    let announced_body = !matches!(head.framing, Framing::Length(0));
    let framing = if bodiless {
        Framing::Length(0)
    } else {
        head.framing
    };
    let close = answer.close || matches!(framing, Framing::UntilClose);
    let mut wire = BytesMut::with_capacity(head.len + 256);
    wire.put_slice(b"HTTP/1.1 ");
    // Three digits (`parse_response` admits 200..=999 only).
    wire.put_slice(&[
        b'0' + (head.status / 100 % 10) as u8,
        b'0' + (head.status / 10 % 10) as u8,
        b'0' + (head.status % 10) as u8,
    ]);
    wire.put_u8(b' ');
    // The standard reason phrase, not the homeserver's (clients ignore it; httparse does not
    // always give it as bytes of the buffer).
    let reason = http::StatusCode::from_u16(head.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    wire.put_slice(reason.as_bytes());
    wire.put_slice(b"\r\n");
    for &(name, value) in &head.headers {
        let n = &rbuf[name.0..name.1];
        let drop = HOP_BY_HOP.iter().any(|h| n.eq_ignore_ascii_case(h))
            || (matches!(framing, Framing::Chunked(_))
                && n.eq_ignore_ascii_case(b"content-length"));
        if !drop {
            wire.put_slice(n);
            wire.put_slice(b": ");
            wire.put_slice(&rbuf[value.0..value.1]);
            wire.put_slice(b"\r\n");
        }
    }
    end_head(&mut wire, answer.request_id, close);
    let _ = rbuf.split_to(head.len);
    let status = head.status;
    match body(pool, down, &mut up, rbuf, wire, framing).await {
        Ok(reusable) => {
            if reusable && head.keep_alive && !(bodiless && announced_body) {
                pool.put(up);
            }
            Done {
                status,
                keep_alive: !close,
                failed: false,
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "response body relay ended early");
            Done {
                status,
                keep_alive: false,
                failed: true,
            }
        }
    }
}

/// Headers of the homeserver's answer that concern its connection with the gateway only.
const HOP_BY_HOP: [&[u8]; 4] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"x-request-id",
];

/// Writes the gateway's own answer `err` instead of a homeserver's.
pub async fn refuse(
    gw: &Gateway,
    down: &mut Stream,
    ctx: &mut Ctx,
    err: GatewayError,
    answer: &Answer<'_>,
) -> Done {
    let status = err.status();
    match write_error(gw, down, &err, answer).await {
        Ok(()) => {
            ctx.rejection = Some(err);
            Done {
                status,
                keep_alive: !answer.close,
                failed: false,
            }
        }
        // As on Pingora's path: an answer that could not be written is a proxy error.
        Err(_) => Done {
            status: 0,
            keep_alive: false,
            failed: true,
        },
    }
}

async fn write_error(
    gw: &Gateway,
    down: &mut Stream,
    err: &GatewayError,
    answer: &Answer<'_>,
) -> io::Result<()> {
    let (head, body) =
        respond::error_wire(err, || gw.error_settings()).map_err(io::Error::other)?;
    let mut wire = BytesMut::with_capacity(head.len() + 128 + body.len());
    wire.put_slice(&head);
    end_head(&mut wire, answer.request_id, answer.close);
    if !answer.head_only {
        wire.put_slice(&body);
    }
    send_down(down, &wire).await
}

/// A client that takes longer than this to accept a write is dropped (its homeserver
/// connection with it).
const CLIENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes to the client, bounded by [`CLIENT_WRITE_TIMEOUT`] (no timer is set when the write
/// completes at once).
async fn write_down(down: &mut Stream, bytes: &[u8]) -> io::Result<()> {
    within(CLIENT_WRITE_TIMEOUT, down.write_all(bytes))
        .await
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))?
}

/// Writes the last bytes of an answer and flushes.
async fn send_down(down: &mut Stream, bytes: &[u8]) -> io::Result<()> {
    if !bytes.is_empty() {
        write_down(down, bytes).await?;
    }
    within(CLIENT_WRITE_TIMEOUT, down.flush())
        .await
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))?
}

fn end_head(wire: &mut BytesMut, request_id: Option<&HeaderValue>, close: bool) {
    if let Some(id) = request_id {
        wire.put_slice(b"x-request-id: ");
        wire.put_slice(id.as_bytes());
        wire.put_slice(b"\r\n");
    }
    if close {
        wire.put_slice(b"connection: close\r\n");
    }
    wire.put_slice(b"\r\n");
}

/// Sends the request head and reads the answer's head. A pooled connection the homeserver
/// closed before answering is replaced by a fresh one, once.
async fn send(
    pool: &Pool,
    out: &[u8],
    rbuf: &mut BytesMut,
) -> io::Result<(TcpStream, ResponseHead)> {
    if let Some(mut conn) = pool.take() {
        match try_send(pool, &mut conn, out, rbuf).await {
            Ok(head) => return Ok((conn, head)),
            Err(Attempt::Stale) => rbuf.clear(),
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
    let mut conn = pool.connect().await?;
    match try_send(pool, &mut conn, out, rbuf).await {
        Ok(head) => Ok((conn, head)),
        Err(Attempt::Stale) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the homeserver closed the connection without answering",
        )),
        Err(Attempt::Failed(e)) => Err(e),
    }
}

enum Attempt {
    /// Closed before a byte of the answer came: safe to send again.
    Stale,
    Failed(io::Error),
}

async fn try_send(
    pool: &Pool,
    conn: &mut TcpStream,
    out: &[u8],
    rbuf: &mut BytesMut,
) -> Result<ResponseHead, Attempt> {
    match within(pool.io_timeout, conn.write_all(out)).await {
        Some(Ok(())) => {}
        Some(Err(e)) if is_reset(&e) => return Err(Attempt::Stale),
        Some(Err(e)) => return Err(Attempt::Failed(e)),
        None => return Err(Attempt::Failed(timed_out())),
    }
    loop {
        // The answer is rarely there yet: a plain time limit (`within` would poll twice).
        let n = match tokio::time::timeout(pool.io_timeout, conn.read_buf(rbuf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if rbuf.is_empty() && is_reset(&e) => return Err(Attempt::Stale),
            Ok(Err(e)) => return Err(Attempt::Failed(e)),
            Err(_) => return Err(Attempt::Failed(timed_out())),
        };
        if n == 0 {
            return Err(if rbuf.is_empty() {
                Attempt::Stale
            } else {
                Attempt::Failed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the homeserver closed the connection inside its answer's head",
                ))
            });
        }
        match parse_response(rbuf).map_err(Attempt::Failed)? {
            Some(head) => return Ok(head),
            None if rbuf.len() > MAX_RESPONSE_HEAD => {
                return Err(Attempt::Failed(io::Error::other("response head too large")))
            }
            None => rbuf.reserve(READ_CHUNK),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the homeserver did not answer in time",
    )
}

/// The parsed head of the homeserver's answer, as offsets into the read buffer.
#[derive(Debug)]
struct ResponseHead {
    len: usize,
    status: u16,
    headers: Vec<((usize, usize), (usize, usize))>,
    framing: Framing,
    /// The homeserver keeps the connection open after this answer.
    keep_alive: bool,
}

/// How the answer's body ends.
#[derive(Debug)]
enum Framing {
    /// After this many bytes.
    Length(u64),
    /// At the last chunk (and its trailers).
    Chunked(Chunked),
    /// When the homeserver closes the connection.
    UntilClose,
}

fn parse_response(buf: &[u8]) -> io::Result<Option<ResponseHead>> {
    // Slots the parser fills, not initialised first (8 KiB an answer otherwise).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    if !(200..=999).contains(&status) {
        // No informational answer is expected: the request has no body and asks no upgrade.
        return Err(io::Error::other(format!("unexpected status {status}")));
    }
    // Header names and values are slices of `buf`; checked all the same, so that a parser
    // that ever hands out other memory makes a 502, not a panic.
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = (s.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(s.len())?;
        (end <= buf.len()).then_some((start, end))
    };
    let bad_span = || io::Error::other("response head outside its buffer");
    let mut keep_alive = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut spans = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            if h.value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding decides; anything but chunked is read until close.
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for v in h.value.split(|b| *b == b',') {
                let v = std::str::from_utf8(v.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| io::Error::other("bad Content-Length"))?;
                if length.is_some_and(|l| l != v) {
                    return Err(io::Error::other("conflicting Content-Length"));
                }
                length = Some(v);
            }
        }
        spans.push((
            span(name).ok_or_else(bad_span)?,
            span(h.value).ok_or_else(bad_span)?,
        ));
    }
    let framing = match (chunked, length) {
        (Some(true), _) => Framing::Chunked(Chunked::default()),
        (Some(false), _) => Framing::UntilClose,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    };
    if matches!(framing, Framing::UntilClose) {
        keep_alive = false;
    }
    Ok(Some(ResponseHead {
        len,
        status,
        headers: spans,
        framing,
        keep_alive,
    }))
}

/// Writes `wire` (the head) and the body as it arrives. `Ok(true)`: the answer ended where
/// its framing said, with nothing after it (the homeserver connection can be reused).
async fn body(
    pool: &Pool,
    down: &mut Stream,
    up: &mut TcpStream,
    mut pending: BytesMut,
    mut wire: BytesMut,
    mut framing: Framing,
) -> io::Result<bool> {
    loop {
        let (take, done) = match &mut framing {
            Framing::Length(left) => {
                let take = pending
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                (take, *left == 0)
            }
            Framing::Chunked(c) => {
                let take = c.feed(&pending)?;
                (take, c.is_done())
            }
            Framing::UntilClose => (pending.len(), false),
        };
        wire.put_slice(&pending[..take]);
        let extra = pending.len() > take;
        if done {
            send_down(down, &wire).await?;
            return Ok(!extra);
        }
        write_down(down, &wire).await?;
        wire.clear();
        pending.clear();
        if pending.capacity() < READ_CHUNK {
            pending.reserve(READ_CHUNK);
        }
        let n = tokio::time::timeout(pool.io_timeout, up.read_buf(&mut pending))
            .await
            .map_err(|_| timed_out())??;
        if n == 0 {
            send_down(down, &[]).await?;
            return match framing {
                Framing::UntilClose => Ok(false),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the homeserver closed the connection inside its answer's body",
                )),
            };
        }
    }
}

/// Finds where a chunked body ends (RFC 9112 §7.1), byte by byte over what passes through.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In a chunk-size line: the size so far and its number of digits.
    #[default]
    Size0,
    Size(u64, u8),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Takes bytes until the body's end; returns how many of `bytes` belong to the body.
    pub fn feed(&mut self, bytes: &[u8]) -> io::Result<usize> {
        use ChunkState::*;
        let bad = || io::Error::other("bad chunked encoding");
        let mut i = 0;
        while i < bytes.len() {
            if self.state == Done {
                return Ok(i);
            }
            if let Data(left) = self.state {
                let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                i += take;
                let left = left - take as u64;
                self.state = if left == 0 { DataCr } else { Data(left) };
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size0, b) => Size(hex(b).ok_or_else(bad)?, 1),
                (Size(n, d), b) if hex(b).is_some() => {
                    if d >= 15 {
                        return Err(bad());
                    }
                    Size(n * 16 + hex(b).unwrap_or(0), d + 1)
                }
                (Size(n, _), b';' | b' ' | b'\t') => Extension(n),
                (Size(n, _), b'\r') => SizeLf(n),
                (Extension(n), b'\r') => SizeLf(n),
                (Extension(_), b'\n') => return Err(bad()),
                (Extension(n), _) => Extension(n),
                (SizeLf(0), b'\n') => TrailerStart,
                (SizeLf(n), b'\n') => Data(n),
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size0,
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart, b'\n') => return Err(bad()),
                (Trailer, b'\r') => TrailerLf,
                (Trailer, b'\n') => return Err(bad()),
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(bad()),
            };
        }
        Ok(i)
    }

    /// The last chunk and the trailers have passed.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends_at(body: &[u8], step: usize) -> Option<usize> {
        let mut c = Chunked::default();
        let mut at = 0;
        for piece in body.chunks(step) {
            let took = c.feed(piece).ok()?;
            at += took;
            if c.is_done() {
                return Some(at);
            }
        }
        None
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_whatever_the_reads() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(ends_at(body, step), Some(body.len() - 4), "step {step}");
        }
        assert_eq!(ends_at(b"0\r\n\r\n", 1), Some(5));
    }

    #[test]
    fn a_broken_or_unfinished_chunked_body_is_never_taken_as_ended() {
        for body in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"z\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"5\r\nhello\r\n0\r\n",
            b"5\r\nhel",
            b"0\r\nX: a\n\nHTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(
                ends_at(body, 1),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_answer_head_gives_the_framing_and_reuse() {
        let head = |s: &str| parse_response(s.as_bytes()).unwrap().unwrap();
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(12)) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert!(matches!(h.framing, Framing::Chunked(_)) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert!(matches!(h.framing, Framing::UntilClose) && !h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(h.framing, Framing::UntilClose) && !h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(4)));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(parse_response(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n")
            .unwrap()
            .is_none());
    }
}
