//! matrix-oidc-gateway: a Pingora reverse proxy that turns any Matrix homeserver into an
//! OIDC-native one (MSC3861). See `README.md` for the request path and `docs/` for the details.

#![recursion_limit = "256"]

pub mod admin;
pub mod auth;
pub mod background;
pub mod binding;
pub mod cli;
pub mod clock;
pub mod compat;
pub mod config;
pub mod error;
pub mod front;
pub mod gateway;
pub mod http_client;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod store;
