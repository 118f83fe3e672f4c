//! Command line.

use std::path::PathBuf;

use clap::Parser;

/// matrix-oidc-gateway: makes any Matrix homeserver OIDC-native (MSC3861).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Configuration file (TOML). Without it, configuration comes from
    /// `MATRIX_OIDC_GATEWAY__*` environment variables alone.
    #[arg(long, short = 'c', env = "MATRIX_OIDC_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print every problem, and exit (non-zero when invalid).
    #[arg(long)]
    pub check_config: bool,

    /// Print the application-service registration (YAML) to install on the homeserver for the
    /// configured AS token and server name, and exit.
    #[arg(long)]
    pub appservice_registration: bool,

    /// Start by taking the listening sockets over from the running gateway (graceful upgrade
    /// through `listen.runtime_dir`; `--reload` starts the new process this way).
    #[arg(long, conflicts_with = "reload")]
    pub upgrade: bool,

    /// Replace the running gateway without dropping a connection: start a new process with
    /// `--upgrade`, hand it the listeners, and return once it serves (systemd's ExecReload).
    /// The old process drains and exits.
    #[arg(long)]
    pub reload: bool,

    /// Probe the admin listener's `/healthz` (container health checks) and exit 0 when healthy.
    #[arg(long)]
    pub healthcheck: bool,
}
