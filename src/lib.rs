//! The `runtime` program: one supervised process per node that replaces a Celery worker
//! fleet. This crate turns a config file into a running supervision tree (built from the
//! `actors` library) plus its HTTP surface; `main.rs` only dispatches the command line.
//!
//! # Layout
//! - [`cli`] — clap definitions: `run` (default), `check`, `inspect`, `tree`, `enqueue`, `dlq`,
//!   `purge`.
//! - [`client`] — the commands that talk to a running node over HTTP; `client::inspect` is
//!   `runtime inspect` (tree, queues, active, stats, ping, events).
//! - [`config`] — raw TOML structs → one `compile()` → a validated `Config`.
//! - [`check`] — `runtime check`: every error and warning of a config, exit 78 on errors.
//! - [`topology`] — the supervision tree a config describes, task definitions, resources.
//! - [`node`] — [`node::Node`]: a node started from a compiled config and native functions,
//!   serving on a listener the caller binds, stopped by a future the caller passes (ordered
//!   stop); `main` binds `http.bind`, maps its errors to exit codes and handles signals.
//! - [`http`] — axum router: health, the tree, tasks, queues, dead letters, the egress proxy,
//!   pools, the events stream over SSE (`http::events`), task search (`http::search`), the
//!   history (`http::stats`), the live page — the dashboard (`http::page`), metrics
//!   (`http::metrics`),
//!   chaos; `http::serve` is the server (connection cap, header and body read timeouts).
//! - [`shutdown`] — SIGINT/SIGTERM handling (a second signal exits at once).
//! - [`telemetry`] — tracing subscriber: `RUST_LOG` filter, text or flat JSON (span fields
//!   such as a task's `task_id` and `trace_id` at the top level).

pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod node;
pub mod shutdown;
pub mod telemetry;
pub mod topology;

pub(crate) use actors::shown::innermost;
