//! Configuration: the TOML file, environment overrides, and validation into the internal
//! [`Config`] that the rest of the gateway reads.
//!
//! Two layers (see `docs/configuration.md`):
//! - [`file`]: the serde model of what operators write (`deny_unknown_fields`; each section's
//!   defaults in one `Default` impl);
//! - [`Config`] (`model`): parsed, validated types (`Url`, `Duration`, `HeaderName`, secrets).
//!
//! In between: `env` (environment overrides), `parse` (value parsers) and `validate` (one
//! validator per section).
//!
//! [`load`] reports **every** problem at once, each naming its key, so `--check-config` can list
//! them all. Environment variables override file keys with one rule: `MATRIX_OIDC_GATEWAY__`
//! followed by the key path in upper case joined with `__` (array entries by index), e.g.
//! `MATRIX_OIDC_GATEWAY__ISSUERS__0__CLIENT_SECRET`. A value that parses as a TOML value (number,
//! boolean, array, quoted string) is taken as that; anything else is a plain string.

mod env;
pub mod file;
mod model;
mod parse;
pub mod secret;
mod validate;

use std::fmt;
use std::path::Path;

pub use model::*;
pub use parse::{normalize_typ, parse_duration};
pub use secret::Secret;

/// The prefix of environment-variable overrides.
pub const ENV_PREFIX: &str = "MATRIX_OIDC_GATEWAY__";

/// One configuration problem, naming the key that causes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `issuers[0].client_secret_file`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found while loading, in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records a problem under `key`.
    pub fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Reads the file (if any), applies environment overrides from `env`, and validates.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, Problems> {
    let mut problems = Problems::default();
    let mut root = match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(t) => t,
                Err(e) => {
                    problems.add(&p.display().to_string(), format!("not valid TOML: {e}"));
                    return Err(problems);
                }
            },
            Err(e) => {
                problems.add("--config", format!("cannot read {}: {e}", p.display()));
                return Err(problems);
            }
        },
        None => toml::Table::new(),
    };
    env::apply_env(&mut root, env, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let file: file::FileConfig = match toml::Value::Table(root).try_into() {
        Ok(f) => f,
        Err(e) => {
            problems.add("(file)", e.to_string().trim().to_owned());
            return Err(problems);
        }
    };
    validate::validate(file)
}

/// Parses a TOML string (tests and `--check-config` on inline text).
pub fn load_str(text: &str) -> Result<Loaded, Problems> {
    let mut problems = Problems::default();
    let root: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            problems.add("(file)", format!("not valid TOML: {e}"));
            return Err(problems);
        }
    };
    let file: file::FileConfig = match toml::Value::Table(root).try_into() {
        Ok(f) => f,
        Err(e) => {
            problems.add("(file)", e.to_string().trim().to_owned());
            return Err(problems);
        }
    };
    validate::validate(file)
}

#[cfg(test)]
mod tests;
