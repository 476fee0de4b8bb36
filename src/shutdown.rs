//! Shutdown signals: the first SIGINT or SIGTERM asks for an orderly stop (and is logged by
//! name); a second one ends the process at once.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::error;

/// Exit code after a second signal (128 + SIGINT, as shells report an interrupted program).
pub const FORCED_EXIT: i32 = 130;

/// SIGINT and SIGTERM, registered before the tree starts so none is missed.
#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn register() -> io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next signal and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    /// After the first signal: a second one exits the process immediately.
    pub fn exit_on_second(mut self) {
        tokio::spawn(async move {
            let name = self.recv().await;
            error!(
                signal = name,
                "second signal during shutdown; exiting at once"
            );
            std::process::exit(FORCED_EXIT);
        });
    }
}
