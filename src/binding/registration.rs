//! The application-service registration file the homeserver needs for the appservice bindings.

use crate::config::Config;

/// The registration YAML for `config`: the configured AS token, a fresh `hs_token` (the gateway
/// receives no transactions, so `url` is null), and an exclusive namespace over every local user.
pub fn registration_yaml(config: &Config) -> Option<String> {
    let as_token = config.homeserver.as_token.as_ref()?;
    let server = regex_escape(&config.homeserver.server_name);
    Some(format!(
        "# Application-service registration for matrix-oidc-gateway.\n\
         # Synapse: list this file in app_service_config_files. Dendrite: app_service_api.config_files.\n\
         # Conduit: paste it into the admin room after `@conduit:<server>: register-appservice`.\n\
         id: matrix-oidc-gateway\n\
         url: null\n\
         as_token: \"{}\"\n\
         hs_token: \"{}\"\n\
         sender_localpart: \"{}\"\n\
         rate_limited: false\n\
         namespaces:\n  users:\n    - exclusive: true\n      regex: '@.*:{server}'\n  aliases: []\n  rooms: []\n",
        as_token.expose(),
        super::homeserver::random_secret(),
        config.homeserver.appservice_sender,
    ))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if ".[]()*+?^$|\\{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_names_the_token_and_an_exclusive_namespace() {
        let text = r#"
            [homeserver]
            url = "http://127.0.0.1:8008"
            server_name = "matrix.example.org"
            kind = "dendrite"
            as_token = "the-as-token"
            [store]
            encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
            [[issuers]]
            issuer = "https://op/"
            client_id = "c"
            client_secret = "s"
        "#;
        let cfg = crate::config::load_str(text).unwrap().config;
        let yaml = registration_yaml(&cfg).unwrap();
        assert!(yaml.contains("as_token: \"the-as-token\""));
        assert!(yaml.contains("regex: '@.*:matrix\\.example\\.org'"));
        assert!(yaml.contains("exclusive: true"));
        assert!(yaml.contains("url: null"));
    }
}
