//! Value parsers shared by the section validators: durations, header names, URLs (with the
//! plain-`http://` warning), server names and JWT `typ` values. Each records a problem under
//! the key it is given and returns a placeholder, so validation goes on and reports everything.

use std::time::Duration;

use http::HeaderName;
use url::Url;

use super::Problems;

/// Parses `500ms`, `30s`, `5m`, `2h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. \"500ms\", \"30s\", \"5m\")"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
    }
}

pub(super) fn duration(problems: &mut Problems, key: &str, s: &str) -> Duration {
    parse_duration(s).unwrap_or_else(|e| {
        problems.add(key, e);
        Duration::ZERO
    })
}

pub(super) fn header_name(problems: &mut Problems, key: &str, s: &str) -> HeaderName {
    HeaderName::from_bytes(s.as_bytes()).unwrap_or_else(|_| {
        problems.add(key, format!("{s:?} is not a valid HTTP header name"));
        HeaderName::from_static("x-invalid")
    })
}

pub(super) fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

pub(super) fn http_url(
    problems: &mut Problems,
    warnings: &mut Vec<String>,
    key: &str,
    s: &str,
) -> Option<Url> {
    match Url::parse(s) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
            if u.host().is_none() {
                problems.add(key, format!("{s:?} has no host"));
                return None;
            }
            if u.scheme() == "http" && !is_loopback_host(&u) {
                warnings.push(format!(
                    "{key}: {s:?} uses plain http:// to a non-loopback host; use https:// in production"
                ));
            }
            Some(u)
        }
        Ok(_) => {
            problems.add(key, format!("{s:?} must be an http:// or https:// URL"));
            None
        }
        Err(e) => {
            problems.add(key, format!("{s:?} is not a URL ({e})"));
            None
        }
    }
}

/// `typ` values compare case-insensitively and without the `application/` prefix (RFC 7515 §4.1.9).
pub fn normalize_typ(t: &str) -> String {
    let lower = t.to_ascii_lowercase();
    lower
        .strip_prefix("application/")
        .map(str::to_owned)
        .unwrap_or(lower)
}

/// Whether `name` is a valid Matrix server name (host with optional port).
pub(super) fn valid_server_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 230
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}
