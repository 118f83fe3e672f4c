//! Log output: `tracing` with a pretty or JSON format. Pingora's own `log` records are bridged in.
//!
//! Third-party crates that print request headers or bodies at `debug`/`trace` (Pingora, hyper,
//! reqwest, h2) are capped at `info` whatever `log.level` says: their debug output contains
//! `Authorization` headers and introspection bodies, and a raw token must never reach a log.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Crates whose verbose output may contain tokens.
const CAPPED: [&str; 9] = [
    "pingora_proxy",
    "pingora_core",
    "pingora_cache",
    "pingora_http",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "wiremock",
];

/// The effective filter for an operator's `log.level`.
pub fn filter(level: &str) -> EnvFilter {
    let mut directives = level.to_owned();
    for krate in CAPPED {
        directives.push_str(&format!(",{krate}=info"));
    }
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber writing to stderr (once; later calls are ignored).
pub fn init(settings: &LogSettings) {
    init_with_writer(settings, std::io::stderr);
}

/// Installs the global subscriber with a custom writer (tests capture logs this way).
pub fn init_with_writer<W>(settings: &LogSettings, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(&settings.level))
        .with_writer(writer);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.with_ansi(false).try_init(),
    };
}
