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

/// TEMPORARY until the config compiler lands: defaults plus `http.bind` / `chaos.enabled`.
pub struct Loaded {
    /// The config.
    pub config: Config,
    /// Warnings.
    pub warnings: Vec<String>,
}

/// TEMPORARY loader.
pub fn load(path: &std::path::Path) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
    let bind = value
        .get("http")
        .and_then(|h| h.get("bind"))
        .and_then(|b| b.as_str())
        .unwrap_or("127.0.0.1:7070")
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    let chaos = value
        .get("chaos")
        .and_then(|h| h.get("enabled"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let max_restarts = value
        .get("supervision")
        .and_then(|h| h.get("max_restarts"))
        .and_then(|b| b.as_integer())
        .unwrap_or(5) as u32;
    Ok(Loaded {
        config: Config {
            runtime: RuntimeSettings {
                shutdown_grace: Duration::from_secs(5),
                heartbeat_interval: Duration::from_secs(1),
            },
            http: HttpSettings {
                bind,
                admin_token: None,
            },
            supervision: SupervisionSettings {
                strategy: Strategy::OneForOne,
                intensity: Intensity::try_new(max_restarts, Duration::from_secs(10)).unwrap(),
                backoff: Backoff::default(),
            },
            chaos: ChaosSettings { enabled: chaos },
        },
        warnings: vec![],
    })
}
