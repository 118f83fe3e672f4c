//! Token extraction (request_filter, step 2): the bearer token from `Authorization` or the
//! deprecated `access_token` query parameter, and the forwarded target without that parameter.
//!
//! Rules (`shared/decisions.md`): a malformed or repeated `Authorization` header, a repeated
//! parameter, or both forms at once are 401 `M_MISSING_TOKEN`. The parameter is removed from the
//! forwarded target whether or not it is accepted, so a token never travels upstream in a URL.
//! The appservice parameters a client could use to act as someone else or forge timestamps
//! ([`APPSERVICE_PARAMS`]) are removed too.

use pingora::http::RequestHeader;

use crate::error::MissingTokenReason;

/// Query parameters only an application service may send; never forwarded from a client.
pub const APPSERVICE_PARAMS: [&str; 4] =
    ["user_id", "device_id", "org.matrix.msc3202.device_id", "ts"];

/// The token a request presented, if any.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented {
    /// No token.
    None,
    /// A bearer token.
    Token(String),
}

/// The result of looking at a request's credentials.
#[derive(Debug, PartialEq, Eq)]
pub struct Extracted {
    /// What was presented.
    pub presented: Presented,
    /// The target to forward when the query had to change (`access_token` removed).
    pub rewritten_target: Option<String>,
}

/// Extracts the bearer token.
pub fn extract(req: &RequestHeader, allow_query: bool) -> Result<Extracted, MissingTokenReason> {
    let mut headers = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let header = match (headers.next(), headers.next()) {
        (None, _) => None,
        (Some(v), None) => Some(parse_bearer(v.as_bytes()).ok_or(MissingTokenReason::Malformed)?),
        (Some(_), Some(_)) => return Err(MissingTokenReason::Malformed),
    };
    let (query_token, rewritten_target) = match req.uri.query() {
        // Homeservers decode parameter names, so `access%5Ftoken` counts too.
        Some(q)
            if q.contains("access_token")
                || q.contains("user_id")
                || q.contains("device_id")
                || q.contains("ts")
                || q.contains('%')
                || q.contains('+') =>
        {
            rewrite_query(req.uri.path(), q)?
        }
        _ => (None, None),
    };
    let query_token = if allow_query { query_token } else { None };
    let presented = match (header, query_token) {
        (Some(_), Some(_)) => return Err(MissingTokenReason::Ambiguous),
        (Some(t), None) => Presented::Token(t.to_owned()),
        (None, Some(t)) => Presented::Token(t),
        (None, None) => Presented::None,
    };
    Ok(Extracted {
        presented,
        rewritten_target,
    })
}

/// `Bearer <b64token>` (RFC 6750 §2.1; the scheme is case-insensitive).
fn parse_bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    valid_b64token(token).then_some(token)
}

/// RFC 6750 `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn valid_b64token(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Removes every `access_token` pair (returning its value) and every appservice parameter from
/// the query, keeping the other pairs byte for byte.
fn rewrite_query(
    path: &str,
    query: &str,
) -> Result<(Option<String>, Option<String>), MissingTokenReason> {
    let mut token = None;
    let mut kept: Vec<&str> = Vec::new();
    let mut removed = false;
    for pair in query.split('&') {
        let mut decoded = form_urlencoded::parse(pair.as_bytes());
        match decoded.next() {
            Some((k, v)) if k == "access_token" => {
                if token.is_some() {
                    return Err(MissingTokenReason::Ambiguous);
                }
                if v.is_empty() || !valid_b64token(&v) {
                    return Err(MissingTokenReason::Malformed);
                }
                token = Some(v.into_owned());
                removed = true;
            }
            Some((k, _)) if APPSERVICE_PARAMS.contains(&k.as_ref()) => removed = true,
            _ => kept.push(pair),
        }
    }
    if !removed {
        return Ok((None, None));
    }
    let target = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    Ok((token, Some(target)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, auth: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        for a in auth {
            r.append_header("Authorization", *a).unwrap();
        }
        r
    }

    #[test]
    fn bearer_header() {
        let e = extract(&req("/x", &["Bearer abc.DEF-_~+/=="]), true).unwrap();
        assert_eq!(e.presented, Presented::Token("abc.DEF-_~+/==".into()));
        let e = extract(&req("/x", &["bearer   tok"]), true).unwrap();
        assert_eq!(e.presented, Presented::Token("tok".into()));
    }

    #[test]
    fn malformed_headers() {
        for bad in [
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Bearer a b",
            "Bearer a\"b",
            "tok",
            "Bearer ===",
        ] {
            assert_eq!(
                extract(&req("/x", &[bad]), true),
                Err(MissingTokenReason::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            extract(&req("/x", &["Bearer a", "Bearer a"]), true),
            Err(MissingTokenReason::Malformed)
        );
    }

    #[test]
    fn query_token_is_taken_and_removed() {
        let e = extract(&req("/s?since=1&access_token=tok&x=%20", &[]), true).unwrap();
        assert_eq!(e.presented, Presented::Token("tok".into()));
        assert_eq!(e.rewritten_target.as_deref(), Some("/s?since=1&x=%20"));
        let e = extract(&req("/s?access_token=tok", &[]), true).unwrap();
        assert_eq!(e.rewritten_target.as_deref(), Some("/s"));
    }

    #[test]
    fn query_token_disabled_is_still_removed() {
        let e = extract(&req("/s?access_token=tok", &[]), false).unwrap();
        assert_eq!(e.presented, Presented::None);
        assert_eq!(e.rewritten_target.as_deref(), Some("/s"));
    }

    #[test]
    fn both_forms_or_repeats_are_ambiguous() {
        assert_eq!(
            extract(&req("/s?access_token=a", &["Bearer b"]), true),
            Err(MissingTokenReason::Ambiguous)
        );
        assert_eq!(
            extract(&req("/s?access_token=a&access_token=a", &[]), true),
            Err(MissingTokenReason::Ambiguous)
        );
    }

    #[test]
    fn encoded_parameter_name_counts() {
        let e = extract(&req("/s?access%5Ftoken=tok", &[]), true).unwrap();
        assert_eq!(e.presented, Presented::Token("tok".into()));
        assert_eq!(e.rewritten_target.as_deref(), Some("/s"));
    }

    #[test]
    fn appservice_parameters_are_removed() {
        let e = extract(
            &req("/s?user_id=%40bob%3Ax&since=1&device_id=D&org.matrix.msc3202.device_id=E&ts=1&user%5Fid=x", &[]),
            true,
        )
        .unwrap();
        assert_eq!(e.presented, Presented::None);
        assert_eq!(e.rewritten_target.as_deref(), Some("/s?since=1"));
    }

    #[test]
    fn unrelated_query_untouched() {
        let e = extract(&req("/s?my_access_token_x=1", &[]), true).unwrap();
        assert_eq!(
            e,
            Extracted {
                presented: Presented::None,
                rewritten_target: None
            }
        );
    }
}
