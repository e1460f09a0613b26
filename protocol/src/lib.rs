//! The unistor wire protocol, and the session runtime both ends share.
//!
//! This crate alone knows the wire format. Layers, bottom up:
//! - [`frame`]: 4-byte big-endian length prefix + JSON body, at most 1 MiB;
//! - [`message`]: the JSON messages (hello, request/response by id, events, ping/pong, errors);
//! - [`dpu`]: the DPU agent's commands and reports;
//! - [`error`]: typed error responses with stable codes;
//! - [`names`]: allow-lists for every name that may reach a command line or a certificate;
//! - [`tls`]: the private CA, certificates and rustls configurations (mutual TLS);
//! - [`lease`]: fencing of mutating commands (one controller at a time, rising tokens);
//! - [`limits`]: bounds on sizes and durations, checked where they enter;
//! - [`server`]: the agent side (accept, caps, handshake deadline, fencing, dispatch, drain);
//! - [`client`]: the controller side (dial by name, verify, correlate, keepalive).
//!
//! `docs/protocol.md` in the repository describes the wire format for other implementers.

#![warn(missing_docs)]

pub mod client;
pub mod clock;
pub mod dpu;
pub mod error;
pub mod frame;
pub mod lease;
pub mod limits;
pub mod message;
pub mod meta;
pub mod names;
pub mod server;
pub mod tls;

pub use error::{ErrorCode, WireError};
pub use message::*;

/// Completes on the first SIGINT or SIGTERM. A second signal exits the process at once (status
/// 130) without waiting for the drain.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("Signal received: draining. A second signal forces exit.");
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("Second signal: exiting now.");
        std::process::exit(130);
    });
}
