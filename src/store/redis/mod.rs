//! The shared backend for several replicas (one Redis server, or Redis Sentinel; Redis Cluster
//! is not supported):
//! - `client`: connections, Sentinel master discovery and failover, command timeouts;
//! - `coordination`: the second-level identity cache, locks with fencing, the fan-out events;
//! - `store`: the [`Store`](crate::store::Store) implementation.
//!
//! Every command has a short timeout (`redis.timeout`): an unavailable Redis answers errors
//! quickly instead of stalling requests, and the callers fall back as docs/scaling.md says.

mod client;
mod coordination;
mod store;

pub use client::Redis;
pub use coordination::Event;
pub use store::RedisStore;
