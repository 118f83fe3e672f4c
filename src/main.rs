use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use matrix_oidc_gateway::{
    binding, cli::Cli, clock::SystemClock, config, lifecycle, logging, server,
};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(l) => l,
        Err(problems) => {
            eprint!("{problems}");
            return ExitCode::from(2);
        }
    };
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    if cli.healthcheck {
        return match healthy(loaded.config.listen.admin) {
            true => ExitCode::SUCCESS,
            false => ExitCode::from(1),
        };
    }
    if cli.appservice_registration {
        return match binding::registration::registration_yaml(&loaded.config) {
            Some(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "homeserver.as_token is not set: the `headers` binding needs no appservice"
                );
                ExitCode::from(2)
            }
        };
    }
    if cli.reload {
        let mut args = Vec::new();
        if let Some(path) = &cli.config {
            args.push("--config".into());
            args.push(path.clone().into_os_string());
        }
        return match lifecycle::reload(loaded.config.listen.runtime_dir.as_deref(), &args) {
            Ok(pid) => {
                println!("pid {pid} serves now; the previous process drains and exits");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    logging::init(&loaded.config.log);
    match server::start(loaded.config, Arc::new(SystemClock), cli.upgrade) {
        Ok(process) => process.run_forever(),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `GET /healthz` on the admin listener, with short timeouts.
fn healthy(admin: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let target = if admin.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], admin.port()))
    } else {
        admin
    };
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&target, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}
