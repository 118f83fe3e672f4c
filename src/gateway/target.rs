//! The upstream request target: the one place that decides what path and query the homeserver
//! sees.
//!
//! The raw target is parsed once (request_filter): the path is kept byte for byte (it is what
//! `classify` judged), the query is split into pairs on **every** separator a supported
//! homeserver honours (`&` and `;`: Twisted, under Synapse, splits on both; see
//! `docs/identity-headers.md` for the per-parser table), and each pair's name is decoded the way
//! the homeservers decode it (`+` is a space, then percent-decoding) before it is judged.
//!
//! - `access_token` (the deprecated query token) is taken out and handed to token extraction;
//!   it never travels upstream.
//! - Appservice parameters ([`is_appservice_param`]) are removed in every spelling: any ASCII
//!   case, percent-encoded, repeated.
//! - Everything else is re-serialised canonically (`name=value` joined by `&`, every byte
//!   outside the unreserved set percent-encoded), so every homeserver parser sees the same
//!   pairs the gateway saw. A query that is already canonical is forwarded untouched.
//!
//! In `appservice_masquerade` mode [`upstream`] puts the gateway's own `user_id` / `device_id`
//! first; they are then the only ones in the query.

use std::borrow::Cow;

use crate::error::MissingTokenReason;

/// A parsed query: the client's pairs minus the ones the gateway consumes or refuses to pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query {
    /// Kept pairs, decoded to bytes.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether the canonical form differs from the raw query (a pair was removed, a separator
    /// was not `&`, or an encoding was not canonical).
    changed: bool,
}

/// What parsing a request target produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The `access_token` parameter's value, when one was present.
    pub query_token: Option<String>,
    /// The kept query; `None` when the target had no query.
    pub query: Option<Query>,
}

/// Whether a decoded parameter name is one only an application service may send: `user_id`,
/// `device_id`, `ts`, anything under `org.matrix.msc3202.`, and any namespaced `*.user_id` /
/// `*.device_id` (unstable spellings of the same assertion). ASCII case is ignored.
pub fn is_appservice_param(name: &[u8]) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(lower.as_slice(), b"user_id" | b"device_id" | b"ts")
        || lower.starts_with(b"org.matrix.msc3202.")
        || lower.ends_with(b".user_id")
        || lower.ends_with(b".device_id")
}

/// `+` as a space, then percent-decoding, to bytes (the homeservers decode to bytes too, so no
/// lossy UTF-8 step may change what they see).
fn decode(raw: &[u8]) -> Vec<u8> {
    let plus: Cow<[u8]> = if raw.contains(&b'+') {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    percent_encoding::percent_decode(&plus).collect()
}

/// Appends the canonical encoding of `bytes` (the `application/x-www-form-urlencoded`
/// serialiser: unreserved bytes as they are, space as `+`, the rest percent-encoded).
fn encode_into(out: &mut String, bytes: &[u8]) {
    out.extend(form_urlencoded::byte_serialize(bytes));
}

/// Parses the query of `raw_target` (everything after the first `?`).
pub fn parse(raw_target: &[u8]) -> Result<Parsed, MissingTokenReason> {
    let Some(at) = raw_target.iter().position(|&b| b == b'?') else {
        return Ok(Parsed::default());
    };
    let raw_query = &raw_target[at + 1..];
    let mut query_token = None;
    let mut query = Query::default();
    for piece in raw_query.split(|&b| b == b'&' || b == b';') {
        if piece.is_empty() {
            continue;
        }
        let (raw_name, raw_value) = match piece.iter().position(|&b| b == b'=') {
            Some(eq) => (&piece[..eq], &piece[eq + 1..]),
            None => (piece, &b""[..]),
        };
        let name = decode(raw_name);
        if name.eq_ignore_ascii_case(b"access_token") {
            // Only the exact spelling is a token (as for the homeservers); any other case is
            // dropped all the same, so nothing token-like travels upstream.
            if name == b"access_token" {
                if query_token.is_some() {
                    return Err(MissingTokenReason::Ambiguous);
                }
                let value = String::from_utf8(decode(raw_value))
                    .map_err(|_| MissingTokenReason::Malformed)?;
                if !super::token::valid_b64token(&value) {
                    return Err(MissingTokenReason::Malformed);
                }
                query_token = Some(value);
            }
            continue;
        }
        if is_appservice_param(&name) {
            continue;
        }
        query.pairs.push((name, decode(raw_value)));
    }
    query.changed = canonical(&query.pairs).as_bytes() != raw_query;
    Ok(Parsed {
        query_token,
        query: Some(query),
    })
}

/// The canonical serialisation of `pairs`.
fn canonical(pairs: &[(Vec<u8>, Vec<u8>)]) -> String {
    let mut out = String::new();
    append_pairs(&mut out, pairs);
    out
}

fn append_pairs(out: &mut String, pairs: &[(Vec<u8>, Vec<u8>)]) {
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(out, name);
        out.push('=');
        encode_into(out, value);
    }
}

/// Who the homeserver is told the request is for, in `appservice_masquerade` mode.
#[derive(Debug, Clone, Copy)]
pub struct Assert<'a> {
    /// `user_id`.
    pub user_id: &'a str,
    /// `device_id`, when the binding has one.
    pub device_id: Option<&'a str>,
}

/// The target to forward, or `None` when the client's raw target can go as it is.
///
/// `path` is the raw target up to the first `?`, exactly as classified.
pub fn upstream(
    raw_target: &[u8],
    query: Option<&Query>,
    assert: Option<Assert<'_>>,
) -> Option<String> {
    let changed = query.is_some_and(|q| q.changed);
    if !changed && assert.is_none() {
        return None;
    }
    let path_end = raw_target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(raw_target.len());
    // The raw target passed classification, which only admits UTF-8.
    let path = String::from_utf8_lossy(&raw_target[..path_end]);
    let mut out = String::with_capacity(raw_target.len() + 64);
    out.push_str(&path);
    let mut first = true;
    if let Some(a) = assert {
        out.push_str("?user_id=");
        encode_into(&mut out, a.user_id.as_bytes());
        if let Some(d) = a.device_id {
            out.push_str("&device_id=");
            encode_into(&mut out, d.as_bytes());
        }
        first = false;
    }
    if let Some(q) = query.filter(|q| !q.pairs.is_empty()) {
        out.push(if first { '?' } else { '&' });
        append_pairs(&mut out, &q.pairs);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(target: &str, assert: Option<Assert<'_>>) -> String {
        let parsed = parse(target.as_bytes()).unwrap();
        upstream(target.as_bytes(), parsed.query.as_ref(), assert)
            .unwrap_or_else(|| target.to_owned())
    }

    const ALICE: Assert<'static> = Assert {
        user_id: "@alice:example.org",
        device_id: Some("ADEV"),
    };

    #[test]
    fn canonical_queries_and_bare_paths_are_forwarded_untouched() {
        for t in [
            "/s",
            "/s?since=s1_2-3.4&timeout=30000",
            "/s?filter=%7B%22a%22%3A1%7D",
        ] {
            let parsed = parse(t.as_bytes()).unwrap();
            assert_eq!(
                upstream(t.as_bytes(), parsed.query.as_ref(), None),
                None,
                "{t}"
            );
        }
    }

    #[test]
    fn semicolons_are_separators_and_smuggled_pairs_are_removed() {
        assert_eq!(
            forwarded("/whoami?x=1;user_id=@victim:s;device_id=V", None),
            "/whoami?x=1"
        );
        assert_eq!(
            forwarded("/whoami?x=1;user_id=@victim:s;device_id=V", Some(ALICE)),
            "/whoami?user_id=%40alice%3Aexample.org&device_id=ADEV&x=1"
        );
    }

    #[test]
    fn every_spelling_of_an_appservice_parameter_is_removed() {
        for q in [
            "user_id=%40v%3As",
            "USER_ID=x",
            "User_Id=x",
            "user%5Fid=x",
            "user%5fid=x",
            "%75ser_id=x",
            "user_id=a&user_id=b",
            "device_id=D",
            "Device_ID=D",
            "org.matrix.msc3202.device_id=D",
            "ORG.MATRIX.MSC3202.DEVICE_ID=D",
            "org.matrix.msc3202.anything=1",
            "io.element.msc4326.device_id=D",
            "ts=1",
            "TS=1",
            "%74s=1",
            "user_id",
            "ACCESS_TOKEN=t",
            "Access_Token=t",
        ] {
            let out = forwarded(&format!("/p?{q}&keep=1"), Some(ALICE));
            assert_eq!(
                out, "/p?user_id=%40alice%3Aexample.org&device_id=ADEV&keep=1",
                "{q}"
            );
        }
    }

    #[test]
    fn names_that_only_contain_a_reserved_name_are_kept() {
        assert_eq!(
            forwarded("/p?my_user_id_x=1&access_token_x=2", None),
            "/p?my_user_id_x=1&access_token_x=2"
        );
    }

    #[test]
    fn values_are_re_encoded_canonically() {
        // `+` is a space for every homeserver parser, and stays one.
        assert_eq!(forwarded("/p?q=a+b%20c&r=%2B", None), "/p?q=a+b+c&r=%2B");
        // A `?` inside the query is data.
        assert_eq!(forwarded("/p?a=1?b=2", None), "/p?a=1%3Fb%3D2");
        // Non-UTF-8 bytes survive as bytes.
        assert_eq!(forwarded("/p?a=%FF", None), "/p?a=%FF");
        // Names without `=` get an empty value, as the homeservers read them.
        assert_eq!(forwarded("/p?flag&&x=1", None), "/p?flag=&x=1");
    }

    #[test]
    fn the_query_token_is_taken_and_never_forwarded() {
        let parsed = parse(b"/s?since=1&access_token=tok;x=2").unwrap();
        assert_eq!(parsed.query_token.as_deref(), Some("tok"));
        let q = parsed.query.unwrap();
        assert_eq!(
            upstream(b"/s?since=1&access_token=tok;x=2", Some(&q), None).as_deref(),
            Some("/s?since=1&x=2")
        );
        assert_eq!(
            parse(b"/s?access%5Ftoken=tok")
                .unwrap()
                .query_token
                .as_deref(),
            Some("tok")
        );
        assert_eq!(
            parse(b"/s?access_token=a;access_token=a"),
            Err(MissingTokenReason::Ambiguous)
        );
        assert_eq!(
            parse(b"/s?access_token=a%20b"),
            Err(MissingTokenReason::Malformed)
        );
        assert_eq!(
            parse(b"/s?access_token="),
            Err(MissingTokenReason::Malformed)
        );
    }

    #[test]
    fn masquerade_parameters_come_first_and_alone() {
        assert_eq!(
            forwarded("/p", Some(ALICE)),
            "/p?user_id=%40alice%3Aexample.org&device_id=ADEV"
        );
        let no_device = Assert {
            user_id: "@a:s",
            device_id: None,
        };
        assert_eq!(
            forwarded("/p?x=1", Some(no_device)),
            "/p?user_id=%40a%3As&x=1"
        );
        assert_eq!(
            forwarded("/p?", Some(ALICE)),
            "/p?user_id=%40alice%3Aexample.org&device_id=ADEV"
        );
    }
}
