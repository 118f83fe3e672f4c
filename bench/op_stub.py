#!/usr/bin/env python3
"""A minimal OP for the benchmark: discovery and RFC 7662 introspection. Every token is active
for user `bench` on device `BENCHDEV01`, except tokens starting with `bad`, which are inactive,
and tokens `user-<name>-<device>-<anything>`, active for user `<name>` on device `<device>`.
`GET /count` returns how many introspections it answered and the most it ever had in flight at
once. The gateway caches verdicts, so this stub's speed does not matter.

Also, for the competitors' scenarios:
- `GET /auth`: the introspection adapter behind nginx `auth_request`: the bearer token of the
  request's `Authorization` header decided as above (one introspection), answered 200 with
  `X-Matrix-User-Id`, or 401;
- `GET /jwks` (and `jwks_uri` in the discovery document): the test key set
  `tests/fixtures/keys/rsa1.jwk.json`, which signs the tokens of `examples/bench_mint_jwt.rs`.

    python3 bench/op_stub.py PORT
"""
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNT = 0
INFLIGHT = 0
MAX_INFLIGHT = 0
LOCK = threading.Lock()
ISSUED_AT = 1_780_000_000
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9500
ISSUER = f"http://127.0.0.1:{PORT}/"
KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "keys")
with open(os.path.join(KEYS, "rsa1.jwk.json")) as f:
    JWKS = {"keys": [json.load(f)]}


def decide(token):
    """One introspection: the RFC 7662 answer for `token`."""
    global COUNT, INFLIGHT, MAX_INFLIGHT
    with LOCK:
        COUNT += 1
        INFLIGHT += 1
        MAX_INFLIGHT = max(MAX_INFLIGHT, INFLIGHT)
    time.sleep(0.005)  # an OP round trip
    with LOCK:
        INFLIGHT -= 1
    if token.startswith("bad"):
        return {"active": False}
    now = int(time.time())
    user, device = "bench", "BENCHDEV01"
    parts = token.split("-")
    if parts[0] == "user" and len(parts) >= 3:
        user, device = parts[1], parts[2]
    return {
        "active": True, "sub": user + "-sub", "username": user, "token_type": "Bearer",
        "scope": "urn:matrix:client:api:* urn:matrix:client:device:" + device,
        # A real OP's iat is fixed at issuance (revocations compare against it), also
        # across a restart of this stub.
        "exp": now + 3600, "iat": ISSUED_AT,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, code, obj, headers=()):
        body = json.dumps(obj).encode()
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/count":
            self._json(200, {"introspections": COUNT, "max_in_flight": MAX_INFLIGHT})
        elif self.path == "/.well-known/openid-configuration":
            self._json(200, {
                "issuer": ISSUER, "introspection_endpoint": ISSUER + "introspect",
                "jwks_uri": ISSUER + "jwks", "authorization_endpoint": ISSUER + "authorize",
                "token_endpoint": ISSUER + "token", "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            })
        elif self.path == "/jwks":
            self._json(200, JWKS)
        elif self.path == "/auth":
            auth = self.headers.get("Authorization") or ""
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            answer = decide(token) if token else {"active": False}
            if answer.get("active"):
                user = "@" + answer["username"] + ":example.org"
                self._json(200, {}, [("X-Matrix-User-Id", user)])
            else:
                self._json(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token"})
        else:
            self._json(404, {})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self._json(200, decide(form.get("token", [""])[0]))

    def log_message(self, fmt, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
