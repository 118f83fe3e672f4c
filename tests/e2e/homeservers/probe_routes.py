#!/usr/bin/env python3
"""Measures which raw request spellings a homeserver routes to an endpoint's handler.

Sends each spelling byte for byte over a socket (no client-side normalisation) and prints the
status and errcode. "unrouted" means the server's generic not-found answer.

    python3 probe_routes.py 127.0.0.1 8008
"""
import json
import socket
import sys

ENDPOINTS = [
    ("POST", "login"), ("GET", "login"), ("POST", "logout"), ("POST", "logout/all"),
    ("POST", "register"), ("GET", "register/available"), ("POST", "account/password"),
    ("POST", "account/deactivate"), ("POST", "delete_devices"), ("POST", "refresh"),
    ("GET", "capabilities"), ("GET", "sync"),
]
PREFIXES = ["/_matrix/client/v3/", "/_matrix/client/r0/", "/_matrix/client/unstable/",
            "/_matrix/client/api/v1/", "/_matrix/client/v1/", "/_matrix/client/v2_alpha/"]
VARIANTS = [
    ("plain", lambda p, e: p + e),
    ("trailing-slash", lambda p, e: p + e + "/"),
    ("double-slash", lambda p, e: p + "/" + e),
    ("dot-segment", lambda p, e: p + "./" + e),
    ("dotdot", lambda p, e: p + "x/../" + e),
    ("pct-first-letter", lambda p, e: p + "%%%02x" % ord(e[0]) + e[1:]),
    ("upper", lambda p, e: p + e.upper()),
    ("semicolon", lambda p, e: p + e + ";x=y"),
    ("fragment", lambda p, e: p + e + "#"),
    ("fragment-dotdot", lambda p, e: p + e + "#/../sync"),
    ("query", lambda p, e: p + e + "?"),
    ("query-dotdot", lambda p, e: p + e + "?/../sync"),
    ("absolute", lambda p, e: "http://evil" + p + e),
]


def send(host, port, method, target):
    body = b"{}" if method == "POST" else b""
    req = (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(req)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else 0
    try:
        errcode = json.loads(rest.split(b"\r\n")[-1] if b"\r\n" in rest else rest).get("errcode", "")
    except Exception:
        errcode = ""
    return status, errcode


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    for method, endpoint in ENDPOINTS:
        for prefix in PREFIXES:
            for name, build in VARIANTS:
                target = build(prefix, endpoint)
                status, errcode = send(host, port, method, target)
                for m in ([method, "HEAD"] if method == "GET" and name == "plain" else [method]):
                    if m != method:
                        status, errcode = send(host, port, m, target)
                    print(f"{m:6} {target:60} {status} {errcode}")


if __name__ == "__main__":
    main()
