//! Secrets in the configuration: `<name>` xor `<name>_file`.
//!
//! A [`Secret`] never prints its value (`Debug` is redacted), so a config dump or a log line
//! cannot leak it.

use std::fmt;
use std::path::Path;

use super::Problems;

/// A secret value read from the configuration or from a file.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value (tests and programmatic configuration).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's bytes, for the few places that must send or compare them.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Resolves `<key>` / `<key>_file` into a secret, recording a problem under the right key when
/// both, or (if `required`) neither, are set, or when the file cannot be read or is empty.
pub fn resolve(
    problems: &mut Problems,
    key: &str,
    value: Option<&str>,
    file: Option<&str>,
    required: bool,
) -> Option<Secret> {
    match (value, file) {
        (Some(_), Some(_)) => {
            problems.add(key, format!("set either `{key}` or `{key}_file`, not both"));
            None
        }
        (Some(v), None) => {
            if v.is_empty() {
                problems.add(key, "must not be empty");
                None
            } else {
                Some(Secret(v.to_owned()))
            }
        }
        (None, Some(path)) => {
            let file_key = format!("{key}_file");
            match std::fs::read_to_string(Path::new(path)) {
                Ok(content) => {
                    let trimmed = content.trim();
                    if trimmed.is_empty() {
                        problems.add(&file_key, format!("{path:?} is empty"));
                        None
                    } else {
                        Some(Secret(trimmed.to_owned()))
                    }
                }
                Err(e) => {
                    problems.add(&file_key, format!("cannot read {path:?} ({e})"));
                    None
                }
            }
        }
        (None, None) => {
            if required {
                problems.add(key, format!("required: set `{key}` or `{key}_file`"));
            }
            None
        }
    }
}
