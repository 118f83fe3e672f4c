//! Token extraction (request_filter, step 2): the bearer token from `Authorization` or the
//! deprecated `access_token` query parameter.
//!
//! Rules (`shared/decisions.md`): a malformed or repeated `Authorization` header, a repeated
//! parameter, or both forms at once are 401 `M_MISSING_TOKEN`. The query itself is parsed by
//! [`super::target`], which also keeps the parameter (and every appservice parameter) out of
//! the forwarded target whether or not the query token is accepted.

use pingora::http::RequestHeader;

use super::target::{self, Query};
use crate::error::MissingTokenReason;

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
    /// The parsed query (for [`target::upstream`]); `None` when the target has none.
    pub query: Option<Query>,
}

/// Extracts the bearer token.
pub fn extract(req: &RequestHeader, allow_query: bool) -> Result<Extracted, MissingTokenReason> {
    let mut headers = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let header = match (headers.next(), headers.next()) {
        (None, _) => None,
        (Some(v), None) => Some(parse_bearer(v.as_bytes()).ok_or(MissingTokenReason::Malformed)?),
        (Some(_), Some(_)) => return Err(MissingTokenReason::Malformed),
    };
    let parsed = target::parse(req.raw_path())?;
    let query_token = if allow_query {
        parsed.query_token
    } else {
        None
    };
    let presented = match (header, query_token) {
        (Some(_), Some(_)) => return Err(MissingTokenReason::Ambiguous),
        (Some(t), None) => Presented::Token(t.to_owned()),
        (None, Some(t)) => Presented::Token(t),
        (None, None) => Presented::None,
    };
    Ok(Extracted {
        presented,
        query: parsed.query,
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
pub(crate) fn valid_b64token(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
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

    fn forwarded(target: &str, e: &Extracted) -> Option<String> {
        target::upstream(target.as_bytes(), e.query.as_ref(), None)
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
        let t = "/s?since=1&access_token=tok&x=%20";
        let e = extract(&req(t, &[]), true).unwrap();
        assert_eq!(e.presented, Presented::Token("tok".into()));
        assert_eq!(forwarded(t, &e).as_deref(), Some("/s?since=1&x=+"));
        let e = extract(&req("/s?access_token=tok", &[]), true).unwrap();
        assert_eq!(forwarded("/s?access_token=tok", &e).as_deref(), Some("/s"));
    }

    #[test]
    fn query_token_disabled_is_still_removed() {
        let e = extract(&req("/s?access_token=tok", &[]), false).unwrap();
        assert_eq!(e.presented, Presented::None);
        assert_eq!(forwarded("/s?access_token=tok", &e).as_deref(), Some("/s"));
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
        assert_eq!(
            forwarded("/s?access%5Ftoken=tok", &e).as_deref(),
            Some("/s")
        );
    }

    #[test]
    fn appservice_parameters_are_removed() {
        let t = "/s?user_id=%40bob%3Ax&since=1&device_id=D&org.matrix.msc3202.device_id=E&ts=1&user%5Fid=x";
        let e = extract(&req(t, &[]), true).unwrap();
        assert_eq!(e.presented, Presented::None);
        assert_eq!(forwarded(t, &e).as_deref(), Some("/s?since=1"));
    }

    #[test]
    fn unrelated_query_untouched() {
        let e = extract(&req("/s?my_access_token_x=1", &[]), true).unwrap();
        assert_eq!(e.presented, Presented::None);
        assert_eq!(forwarded("/s?my_access_token_x=1", &e), None);
    }
}
