//! The actors of the runtime (in progress).

pub mod supervisor;
