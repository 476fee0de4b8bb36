//! The integration tests, one binary: each module is what was one `tests/*.rs` file (the
//! runtime binary, its HTTP surface, Redis, real Celery, Chromium…), and `common` their
//! shared harness. One binary links the whole stack once instead of once per file.
//!
//! Run one module with `cargo test --test it MODULE::` (e.g. `cargo test --test it http::`).

mod bad_input;
mod beat;
mod celery;
mod chaos;
mod check;
mod cli;
mod cluster;
mod common;
mod deploy;
mod events;
mod help;
mod http;
mod metrics;
mod node;
mod numbers;
mod observability;
mod page;
mod pools;
mod processes;
mod python;
mod quickstart;
mod redis_node;
mod resources;
mod security;
mod slow_clients;
