//! The answers the gateway owns: OAuth discovery (MSC2965) and the rewrites of `/versions` and
//! `/capabilities` that tell clients the OP now handles authentication.

use serde_json::{json, Map, Value};

use super::classify::Document;
use crate::auth::op::{OpClient, OpMetadata};
use crate::config::{Config, Discovery};
use crate::error::GatewayError;

/// Unstable features added to `/versions` (the versions themselves are never changed).
pub const UNSTABLE_FEATURES: [&str; 3] = [
    "org.matrix.msc3861",
    "org.matrix.msc2965",
    "org.matrix.msc2967",
];

/// Capabilities the OP owns, disabled in every `/capabilities` answer.
pub const DISABLED_CAPABILITIES: [&str; 3] =
    ["m.change_password", "m.3pid_changes", "m.get_login_token"];

/// The body of a discovery document, from the OP's metadata (fetched first when the gateway
/// has none yet; an OP that cannot be reached is a 503).
pub async fn document(
    op: &OpClient,
    config: &Config,
    doc: Document,
) -> Result<Value, GatewayError> {
    let meta = op
        .known_metadata()
        .await
        .map_err(GatewayError::OpUnavailable)?;
    let discovery = &config.discovery;
    Ok(match doc {
        Document::AuthMetadata => {
            let n = &config.notifications;
            let revocation = n.revocation_proxy.then(|| {
                format!(
                    "{}{}",
                    discovery.public_base_url.as_str().trim_end_matches('/'),
                    n.revocation_path
                )
            });
            auth_metadata(&meta, discovery, revocation.as_deref())
        }
        Document::AuthIssuer => auth_issuer(&meta),
        Document::WellKnownClient => well_known(&meta, discovery),
    })
}

/// `account_management_uri`: the OP's own, or the configured one.
pub fn account_uri(meta: &OpMetadata, discovery: &Discovery) -> Option<String> {
    meta.document
        .get("account_management_uri")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            discovery
                .account_management_uri
                .as_ref()
                .map(|u| u.to_string())
        })
}

/// `GET /_matrix/client/v1/auth_metadata`: the OP's RFC 8414 metadata, with what the
/// configuration fills in where the OP lacks it. `issuer` is never rewritten (clients check
/// the ID token's `iss` against it). `revocation_endpoint` may be replaced by the gateway's own.
pub fn auth_metadata(meta: &OpMetadata, discovery: &Discovery, revocation: Option<&str>) -> Value {
    let mut doc: Map<String, Value> = meta.document.clone();
    if let Some(r) = revocation {
        // Clients revoke through the gateway so it can sign the device out at once.
        doc.insert("revocation_endpoint".into(), Value::String(r.to_owned()));
    }
    if !doc.contains_key("registration_endpoint") {
        if let Some(u) = &discovery.registration_endpoint {
            doc.insert("registration_endpoint".into(), Value::String(u.to_string()));
        }
    }
    if let Some(u) = account_uri(meta, discovery) {
        doc.insert("account_management_uri".into(), Value::String(u));
    }
    // The spec requires these; RFC 8414 defaults make them safe to state when the OP omits them.
    doc.entry("response_modes_supported")
        .or_insert_with(|| json!(["query", "fragment"]));
    doc.entry("code_challenge_methods_supported")
        .or_insert_with(|| json!(["S256"]));
    Value::Object(doc)
}

/// `GET /_matrix/client/unstable/org.matrix.msc2965/auth_issuer`.
pub fn auth_issuer(meta: &OpMetadata) -> Value {
    json!({"issuer": meta.issuer})
}

/// `GET /.well-known/matrix/client`.
pub fn well_known(meta: &OpMetadata, discovery: &Discovery) -> Value {
    let base = discovery
        .public_base_url
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let mut auth = json!({"issuer": meta.issuer});
    if let Some(account) = account_uri(meta, discovery) {
        auth["account"] = Value::String(account);
    }
    json!({
        "m.homeserver": {"base_url": base},
        "org.matrix.msc2965.authentication": auth,
    })
}

/// Adds the OAuth unstable features to a `/versions` answer.
pub fn rewrite_versions(body: &mut Value) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let features = obj
        .entry("unstable_features")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(f) = features.as_object_mut() {
        for name in UNSTABLE_FEATURES {
            f.insert(name.into(), Value::Bool(true));
        }
    }
}

/// Disables the OP-owned capabilities in a `/capabilities` answer, adding them when absent.
pub fn rewrite_capabilities(body: &mut Value) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let caps = obj
        .entry("capabilities")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(c) = caps.as_object_mut() {
        for name in DISABLED_CAPABILITIES {
            c.insert(name.into(), json!({"enabled": false}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use url::Url;

    fn meta(extra: Value) -> OpMetadata {
        let mut document = json!({
            "issuer": "https://op.example/",
            "authorization_endpoint": "https://op.example/auth",
            "token_endpoint": "https://op.example/token",
        });
        document
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        OpMetadata {
            issuer: "https://op.example/".into(),
            introspection_endpoint: None,
            jwks_uri: None,
            document: document.as_object().unwrap().clone(),
        }
    }

    fn discovery() -> Discovery {
        Discovery {
            public_base_url: Url::parse("https://matrix.example/").unwrap(),
            account_management_uri: Some(Url::parse("https://op.example/account").unwrap()),
            registration_endpoint: Some(Url::parse("https://op.example/register").unwrap()),
        }
    }

    #[test]
    fn metadata_is_filled_not_overridden() {
        let m = auth_metadata(
            &meta(json!({"registration_endpoint": "https://op.example/reg"})),
            &discovery(),
            None,
        );
        assert_eq!(m["issuer"], "https://op.example/");
        assert_eq!(m["registration_endpoint"], "https://op.example/reg");
        assert_eq!(m["account_management_uri"], "https://op.example/account");
        assert_eq!(m["response_modes_supported"], json!(["query", "fragment"]));
        let m = auth_metadata(&meta(json!({})), &discovery(), Some("https://gw/revoke"));
        assert_eq!(m["revocation_endpoint"], "https://gw/revoke");
        assert_eq!(m["registration_endpoint"], "https://op.example/register");
    }

    #[test]
    fn well_known_shape() {
        let w = well_known(&meta(json!({})), &discovery());
        assert_eq!(w["m.homeserver"]["base_url"], "https://matrix.example");
        assert_eq!(
            w["org.matrix.msc2965.authentication"]["issuer"],
            "https://op.example/"
        );
        assert_eq!(
            w["org.matrix.msc2965.authentication"]["account"],
            "https://op.example/account"
        );
    }

    #[test]
    fn versions_gain_features_and_keep_versions() {
        let mut v = json!({"versions": ["v1.11"], "unstable_features": {"x": false}});
        rewrite_versions(&mut v);
        assert_eq!(v["versions"], json!(["v1.11"]));
        assert_eq!(v["unstable_features"]["x"], false);
        for f in UNSTABLE_FEATURES {
            assert_eq!(v["unstable_features"][f], true);
        }
    }

    #[test]
    fn capabilities_are_disabled_or_added() {
        let mut c = json!({"capabilities": {"m.room_versions": {"default": "10"}, "m.change_password": {"enabled": true}}});
        rewrite_capabilities(&mut c);
        assert_eq!(c["capabilities"]["m.room_versions"]["default"], "10");
        for k in DISABLED_CAPABILITIES {
            assert_eq!(c["capabilities"][k], json!({"enabled": false}));
        }
    }
}
