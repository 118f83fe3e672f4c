//! The public listener's HTTP/1 driver (`src/front`): what a client notices of it. Answers
//! framed every way a homeserver frames them arrive whole, one connection carries requests the
//! driver relays and requests Pingora's proxy serves in any order, pipelined requests are
//! answered in order, and a homeserver connection that went stale is replaced without the
//! client seeing an error. The homeserver here is a scripted TCP server, so the framing is
//! exactly what each test writes.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SYNC: &str = "/_matrix/client/v3/sync";

/// What the scripted homeserver does with one request: its answer, and whether it closes the
/// connection after it.
type Script = Arc<dyn Fn(&str) -> (Vec<u8>, bool) + Send + Sync>;

/// A homeserver that answers each request head by `script`, and counts connections.
struct RawHomeserver {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn raw_homeserver(script: Script) -> RawHomeserver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let body = head
                            .to_ascii_lowercase()
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: ").map(str::to_owned))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
                        while buf.len() < end + 4 + body {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + body);
                        let (answer, close) = script(&head);
                        if s.write_all(&answer).await.is_err() || close {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    RawHomeserver { addr, connections }
}

/// A `200` with `{}`.
const EMPTY_OBJECT: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";

/// A script that answers every request with `answer` (closing the connection after it when
/// `close`).
fn always(answer: &'static str, close: bool) -> Script {
    Arc::new(move |_: &str| (answer.as_bytes().to_vec(), close))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A gateway in front of `hs`; token `t` is alice's.
async fn gateway(f: &Fakes, hs: &RawHomeserver) -> TestGateway {
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    let cfg = f
        .config("")
        .replace(&f.hs.uri(), &format!("http://{}", hs.addr));
    spawn(&cfg).await
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\n\r\n")
}

/// Reads exactly one HTTP/1.1 response (Content-Length or chunked) from `s`; returns its
/// head and decoded body.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a whole head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    buf.drain(..head_end + 4);
    let mut body = Vec::new();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        fill(s, buf, len).await;
        body = buf.drain(..len).collect();
    } else if head.contains("transfer-encoding: chunked") {
        loop {
            while find(buf, b"\r\n").is_none() {
                let want = buf.len() + 1;
                fill(s, buf, want).await;
            }
            let line_end = find(buf, b"\r\n").unwrap();
            let size = usize::from_str_radix(
                std::str::from_utf8(&buf[..line_end])
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap(),
                16,
            )
            .unwrap();
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer lines, then the empty line.
                loop {
                    while find(buf, b"\r\n").is_none() {
                        let want = buf.len() + 1;
                        fill(s, buf, want).await;
                    }
                    let end = find(buf, b"\r\n").unwrap();
                    buf.drain(..end + 2);
                    if end == 0 {
                        break;
                    }
                }
                break;
            }
            fill(s, buf, size + 2).await;
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    }
    (head, body)
}

/// Reads from `s` until `buf` holds `want` bytes.
async fn fill(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, want: usize) {
    let mut chunk = [0u8; 8192];
    while buf.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("body in time")
            .unwrap();
        assert!(n > 0, "connection closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn answers_arrive_whole_however_the_homeserver_frames_them() {
    let big = "x".repeat(100_000);
    let big2 = big.clone();
    let hs = raw_homeserver(Arc::new(move |head: &str| {
        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
        let answer = if path.ends_with("/chunked") {
            let mut a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n".to_vec();
            for piece in big2.as_bytes().chunks(7_000) {
                a.extend_from_slice(format!("{:x};ext\r\n", piece.len()).as_bytes());
                a.extend_from_slice(piece);
                a.extend_from_slice(b"\r\n");
            }
            a.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
            a
        } else if path.ends_with("/empty") {
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
        } else {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big2}", big2.len()).into_bytes()
        };
        (answer, false)
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    // One keep-alive connection: each answer must end exactly where its framing says, or the
    // next one would not parse.
    for (path, status, body) in [
        ("/_matrix/client/v3/x/chunked", "200", big.as_str()),
        ("/_matrix/client/v3/x/length", "200", big.as_str()),
        ("/_matrix/client/v3/x/empty", "204", ""),
        ("/_matrix/client/v3/x/chunked", "200", big.as_str()),
    ] {
        s.write_all(get(path).as_bytes()).await.unwrap();
        let (head, got) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(head.contains("x-request-id: "), "{head}");
        assert_eq!(got.len(), body.len(), "{path}");
        assert!(got == body.as_bytes(), "{path}");
    }
    assert!(buf.is_empty());
}

#[tokio::test]
async fn an_answer_that_ends_with_the_connection_ends_the_clients_too() {
    let hs = raw_homeserver(Arc::new(|_: &str| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close".to_vec(),
            true,
        )
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let out = raw_exchange(gw.addr, get(SYNC).as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\nuntil close"), "{out}");
}

#[tokio::test]
async fn relayed_and_proxied_requests_share_a_connection_in_any_order() {
    let hs = raw_homeserver(Arc::new(|head: &str| {
        let line = head.lines().next().unwrap_or_default().to_owned();
        let body = format!("{{\"saw\":\"{line}\"}}");
        (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            false,
        )
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let post = "POST /_matrix/client/v3/createRoom HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\nContent-Length: 2\r\n\r\n{}";
    let sync = get(SYNC);
    let versions = "GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    for req in [
        sync.as_str(),
        post,
        sync.as_str(),
        versions,
        sync.as_str(),
        post,
    ] {
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("http/1.1 200"), "{req}: {head}");
        let line = req.lines().next().unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains(line) || line.contains("/versions"),
            "{req}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // Pipelined: two relayed requests and a proxied one in one write, answered in order.
    let all = format!("{sync}{sync}{post}");
    s.write_all(all.as_bytes()).await.unwrap();
    for want in ["GET", "GET", "POST"] {
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(&format!("\"saw\":\"{want} ")),
            "{want}: {body}"
        );
    }
}

#[tokio::test]
async fn a_homeserver_connection_closed_while_idle_is_replaced_unseen() {
    // The homeserver closes every connection after its answer without saying so: the pooled
    // connection is dead when the next request takes it.
    let hs = raw_homeserver(always(EMPTY_OBJECT, true)).await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let req = get(SYNC);
    let answers = raw_sequence(gw.addr, &[req.as_bytes(), req.as_bytes(), req.as_bytes()]).await;
    assert_eq!(answers.len(), 3, "{answers:?}");
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }
    assert_eq!(hs.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn homeserver_connections_are_reused_across_clients() {
    let hs = raw_homeserver(always(EMPTY_OBJECT, false)).await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let req = get(SYNC);
    for _ in 0..5 {
        let out = raw_sequence(gw.addr, &[req.as_bytes(), req.as_bytes()]).await;
        assert!(out.iter().all(|a| a.starts_with("HTTP/1.1 200")), "{out:?}");
    }
    assert_eq!(hs.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_broken_answer_is_a_502_json_and_the_client_connection_lives_on() {
    let hs = raw_homeserver(Arc::new(|head: &str| {
        if head.contains("/broken") {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd".to_vec(),
                true,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
                false,
            )
        }
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let broken = get("/_matrix/client/v3/broken");
    let fine = get(SYNC);
    let out = raw_sequence(gw.addr, &[broken.as_bytes(), fine.as_bytes()]).await;
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].starts_with("HTTP/1.1 502"), "{}", out[0]);
    assert!(out[0].contains("\"errcode\":\"M_UNKNOWN\""), "{}", out[0]);
    assert!(out[1].starts_with("HTTP/1.1 200"), "{}", out[1]);
}

#[tokio::test]
async fn what_the_homeserver_receives_is_the_prepared_request_only() {
    // The client's spoofed identity headers, its token and its hop-by-hop header never reach
    // the homeserver on the driver's path; the gateway's own headers do.
    let seen = Arc::new(parking_lot::Mutex::new(String::new()));
    let record = seen.clone();
    let hs = raw_homeserver(Arc::new(move |head: &str| {
        *record.lock() = head.to_owned();
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            false,
        )
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let req = format!(
        "GET {SYNC}?since=1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\n\
         X-Matrix-User-Id: @mallory:example.org\r\nx_matrix_user_id: @mallory:example.org\r\n\
         Connection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    );
    let out = raw_exchange(gw.addr, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let head = seen.lock().to_ascii_lowercase();
    assert!(
        head.starts_with(&format!("get {SYNC}?since=1 http/1.1\r\n")),
        "{head}"
    );
    assert!(!head.contains("mallory"), "{head}");
    assert!(
        head.contains("x-matrix-user-id: @alice:example.org"),
        "{head}"
    );
    assert!(!head.contains("authorization"), "{head}");
    assert!(!head.contains("connection:"), "{head}");
    assert!(!head.contains("6.6.6.6"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
}

#[tokio::test]
async fn status_lines_without_or_with_unusual_reasons_pass() {
    // httparse hands out such reasons outside the read buffer: the driver once sliced the
    // buffer with them (a panic, so with `panic = "abort"` the whole process).
    let hs = raw_homeserver(Arc::new(|head: &str| {
        let line = if head.contains("/none") {
            "HTTP/1.1 200\r\n"
        } else if head.contains("/latin") {
            "HTTP/1.1 404 N\u{e3}o encontrado\r\n"
        } else {
            "HTTP/1.1 418 \r\n"
        };
        (
            format!("{line}Content-Length: 2\r\n\r\n{{}}").into_bytes(),
            false,
        )
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let reqs: Vec<String> = ["/none", "/latin", "/empty"]
        .iter()
        .map(|p| get(&format!("/_matrix/client/v3/x{p}")))
        .collect();
    let out = raw_sequence(
        gw.addr,
        &reqs.iter().map(|r| r.as_bytes()).collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(out[0].starts_with("HTTP/1.1 200 OK\r\n"), "{}", out[0]);
    assert!(
        out[1].starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{}",
        out[1]
    );
    assert!(out[2].starts_with("HTTP/1.1 418 "), "{}", out[2]);
    assert!(out.iter().all(|o| o.ends_with("\r\n\r\n{}")), "{out:?}");
}

#[tokio::test]
async fn stray_bytes_after_an_answer_never_reach_the_next_request() {
    // The homeserver answers a HEAD with a body, in a second write after a pause: the gateway
    // has given the connection back by then. The next request (another client's) must get its
    // own answer, not those bytes.
    let hs_addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = find(&buf, b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            // A HEAD answer whose announced body comes later, or a whole
                            // answer: either way, after a pause, bytes nobody asked for.
                            let first: Option<&[u8]> = if head.contains("x-test-stray") {
                                Some(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"first\":\"1\"}")
                            } else if head.starts_with("HEAD") {
                                Some(b"HTTP/1.1 200 OK\r\nContent-Length: 52\r\n\r\n")
                            } else {
                                None
                            };
                            if let Some(first) = first {
                                let _ = s.write_all(first).await;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let stray =
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"x\":\"y\"}";
                                let _ = s.write_all(stray).await;
                            } else {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"own\":\"1\"}").await;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        addr
    };
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    let cfg = f
        .config("")
        .replace(&f.hs.uri(), &format!("http://{hs_addr}"));
    let gw = spawn(&cfg).await;
    let head =
        format!("HEAD {SYNC} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\n\r\n");
    let out = raw_exchange(gw.addr, head.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {out}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let out = raw_exchange(gw.addr, get(SYNC).as_bytes()).await;
    assert!(out.ends_with("{\"own\":\"1\"}"), "{out}");

    // A whole answer that the homeserver follows with stray bytes while its connection is
    // idle in the pool: that connection is not lent to the next request.
    let stray = format!(
        "GET {SYNC} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\nX-Test-Stray: 1\r\n\r\n"
    );
    let out = raw_exchange(gw.addr, stray.as_bytes()).await;
    assert!(out.ends_with("{\"first\":\"1\"}"), "{out}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let out = raw_exchange(gw.addr, get(SYNC).as_bytes()).await;
    assert!(out.ends_with("{\"own\":\"1\"}"), "{out}");
}

#[tokio::test]
async fn refusals_on_the_drivers_path_are_matrix_json_and_keep_the_connection() {
    let hs = raw_homeserver(always(EMPTY_OBJECT, false)).await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let no_token = format!("GET {SYNC} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let owned = "GET /_matrix/client/v3/login HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let head = format!("HEAD {SYNC} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let out = raw_sequence(
        gw.addr,
        &[
            no_token.as_bytes(),
            owned.as_bytes(),
            head.as_bytes(),
            get(SYNC).as_bytes(),
        ],
    )
    .await;
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(out[0].starts_with("HTTP/1.1 401"), "{}", out[0]);
    assert!(
        out[0].contains("\"errcode\":\"M_MISSING_TOKEN\""),
        "{}",
        out[0]
    );
    assert!(out[1].starts_with("HTTP/1.1 404"), "{}", out[1]);
    assert!(
        out[1].contains("\"errcode\":\"M_UNRECOGNIZED\""),
        "{}",
        out[1]
    );
    assert!(
        out[2].starts_with("HTTP/1.1 401") && out[2].ends_with("\r\n\r\n"),
        "{}",
        out[2]
    );
    assert!(out[3].starts_with("HTTP/1.1 200"), "{}", out[3]);
    for o in &out[..3] {
        let lower = o.to_ascii_lowercase();
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{o}"
        );
        assert!(lower.contains("\r\nx-request-id: "), "{o}");
        assert!(!lower.contains("connection: close"), "{o}");
    }
    assert!(
        out[3].to_ascii_lowercase().contains("\r\nx-request-id: "),
        "{}",
        out[3]
    );
    assert_eq!(hs.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_bodiless_answer_that_announced_a_body_does_not_reuse_its_connection() {
    // A HEAD answer with a length (or a 204 with chunks): the homeserver may still send the
    // body it announced, so the connection is closed rather than lent to the next request.
    let hs = raw_homeserver(Arc::new(|head: &str| {
        let answer = if head.starts_with("HEAD") {
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        } else if head.contains("/nocontent") {
            "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        };
        (answer.as_bytes().to_vec(), false)
    }))
    .await;
    let f = Fakes::start().await;
    let gw = gateway(&f, &hs).await;
    let head =
        format!("HEAD {SYNC} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\n\r\n");
    let nocontent = get("/_matrix/client/v3/x/nocontent");
    let out = raw_sequence(
        gw.addr,
        &[
            head.as_bytes(),
            get(SYNC).as_bytes(),
            nocontent.as_bytes(),
            get(SYNC).as_bytes(),
            get(SYNC).as_bytes(),
        ],
    )
    .await;
    assert_eq!(out.len(), 5, "{out:?}");
    assert!(
        out[0].starts_with("HTTP/1.1 200") && out[0].ends_with("\r\n\r\n"),
        "{}",
        out[0]
    );
    assert!(out[1].ends_with("{}"), "{}", out[1]);
    assert!(
        out[2].starts_with("HTTP/1.1 204") && out[2].ends_with("\r\n\r\n"),
        "{}",
        out[2]
    );
    assert!(out[3].ends_with("{}") && out[4].ends_with("{}"), "{out:?}");
    // HEAD's connection and the 204's were closed; the plain answers' connection was reused.
    assert_eq!(hs.connections.load(Ordering::SeqCst), 3);
}
