//! Configuration: raw TOML structs → one `compile()` → a validated [`Config`].
//!
//! PLACEHOLDER — being written by the config work item; the shapes below are the interface
//! the rest of the program uses.

use std::net::SocketAddr;
use std::time::Duration;

use actors::supervisor::{Backoff, Intensity, Strategy};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[runtime]`
    pub runtime: RuntimeSettings,
    /// `[http]`
    pub http: HttpSettings,
    /// `[supervision]`
    pub supervision: SupervisionSettings,
    /// `[chaos]`
    pub chaos: ChaosSettings,
}

/// `[runtime]`
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Time allowed for an orderly stop after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// How often the heartbeat actor records uptime.
    pub heartbeat_interval: Duration,
}

/// `[http]`
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Listen address.
    pub bind: SocketAddr,
    /// Bearer token for mutating routes (the value of `admin_token_env`).
    pub admin_token: Option<String>,
}

/// `[supervision]`
#[derive(Debug, Clone)]
pub struct SupervisionSettings {
    /// Strategy of every supervisor.
    pub strategy: Strategy,
    /// Restart intensity.
    pub intensity: Intensity,
    /// Restart backoff.
    pub backoff: Backoff,
}

/// `[chaos]`
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    /// Whether `POST /chaos/kill/{path}` exists.
    pub enabled: bool,
}
