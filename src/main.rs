use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use matrix_oidc_gateway::{binding, cli::Cli, clock::SystemClock, config, logging, server};

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
    logging::init(&loaded.config.log);
    match server::build(loaded.config, Arc::new(SystemClock)) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
