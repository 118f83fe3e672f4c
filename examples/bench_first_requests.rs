//! Benchmark helper: N concurrent first requests of one new token through the gateway.
//!   cargo run --release --example bench_first_requests -- http://127.0.0.1:8008 1000 TOKEN

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]
fn main() {
    let mut args = std::env::args().skip(1);
    let base = args.next().expect("gateway URL");
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let token = args.next().expect("token");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(n)
            .build()
            .unwrap();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let c = client.clone();
            let url = format!("{base}/_matrix/client/v3/account/whoami");
            let t = token.clone();
            tasks.push(tokio::spawn(async move {
                c.get(url)
                    .bearer_auth(t)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap_or(0) == 200 {
                ok += 1;
            }
        }
        println!("first_requests sent={n} ok={ok}");
    });
}
