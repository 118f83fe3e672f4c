# Helpers shared by the benchmark scripts (sourced, not run).

# Installs wrk and nginx (Debian) when missing.
bench_install() {
  local need=()
  for pkg in wrk nginx; do command -v "$pkg" >/dev/null || need+=("$pkg"); done
  if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "bench: install ${need[*]}" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# A scratch directory ($work) and the processes to stop on exit ($pids, nginx).
bench_workdir() {
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT INT TERM
}
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done || true
  rm -rf "$work"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "bench: nothing on port $1" >&2; exit 1
}
# wrk's latency figures (us, ms, s) in milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000} else print v}'; }
# A figure of bench/op_stub.py's GET /count: op_count PORT introspections|max_in_flight
op_count() { curl -s "http://127.0.0.1:$1/count" | python3 -c "import sys,json; print(json.load(sys.stdin)['$2'])"; }

# write_nginx_conf NAME BLOCK: $work/NAME.conf for one nginx (pid file $work/NAME.pid): one
# worker, no access log, BLOCK inside `http { }`. Start it with `nginx -c "$work/NAME.conf" -p "$work"`.
write_nginx_conf() {
  cat >"$work/$1.conf" <<NGINX
worker_processes 1;
pid $work/$1.pid;
error_log $work/$1-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
$2
}
NGINX
}
# static_json_server PORT BODY: a server block answering every request with 200 and BODY (JSON).
static_json_server() {
  printf "  server {\n    listen 127.0.0.1:%s;\n    location / { default_type application/json; return 200 '%s'; }\n  }\n" "$1" "$2"
}
# cache_lookups ADMIN_PORT [RESULT]: a gateway's count of identity-cache lookups (with that
# result label: hit, negative_hit, miss, ...), from its metrics.
cache_lookups() {
  curl -s "http://127.0.0.1:$1/metrics" | awk -v r="${2:-}" '
    /^matrix_oidc_gateway_auth_cache_lookups_total\{/ && (r == "" || index($0, "result=\"" r "\"")) {s += $NF}
    END {printf "%d\n", s}'
}
# median: the median of the numbers on stdin, one a line (0 for none).
median() { sort -g | awk '{v[NR]=$1} END {if (NR == 0) print 0; else if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
# gateway_toml PORT ADMIN ISSUER_LINES [LISTEN_LINES]: a one-worker gateway in front of the
# upstream on $UP, trusting the OP on $OP, with its own sqlite store. Callers append the
# tables they need ([cache], [log], [auth]) after it.
gateway_toml() {
  cat <<TOML
[listen]
public = "127.0.0.1:$1"
admin = "127.0.0.1:$2"
threads = 1${4:+
$4}
[homeserver]
url = "http://127.0.0.1:$UP"
server_name = "example.org"
[store]
path = "$work/state-$1.sqlite3"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
[[issuers]]
issuer = "http://127.0.0.1:$OP/"
$3
TOML
}
# introspection_issuer: the issuer lines for bench/op_stub.py's introspection endpoint.
introspection_issuer() {
  printf 'introspection_endpoint = "http://127.0.0.1:%s/introspect"\nclient_id = "bench"\nclient_secret = "bench"\n' "$OP"
}
