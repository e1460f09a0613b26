//! Errors that cross the wire: a stable code, a human message, and optional context.

use serde::{Deserialize, Serialize};

use crate::message::LeaseInfo;
use crate::names::NameError;

/// Stable error codes. New codes may be added; clients map codes they do not know to
/// [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame that is not valid JSON, or not a valid message (unknown field, wrong type).
    Malformed,
    /// A frame larger than the limit was announced.
    FrameTooLarge,
    /// The peers speak different protocol versions.
    UnsupportedVersion,
    /// A message that is not allowed at this point (e.g. a request before the hello).
    ProtocolViolation,
    /// A mutating command without a lease; acquire one first.
    NoLease,
    /// Another controller holds the lease.
    LeaseHeld,
    /// The fencing token is not the current one.
    StaleToken,
    /// A name failed its allow-list; `field` names it.
    InvalidName,
    /// Some other argument is invalid (size, count...); `field` names it.
    InvalidArgument,
    /// The agent does not serve this command.
    UnsupportedCommand,
    /// The object does not exist.
    NotFound,
    /// An object of that name exists with a different spec.
    Conflict,
    /// The object exists but unistor does not own it.
    NotOwned,
    /// The object is in use (e.g. the image has watchers).
    InUse,
    /// The command would shrink an image.
    ShrinkRefused,
    /// An external command failed; the message carries its stderr.
    CommandFailed,
    /// An external command or the request ran past its deadline.
    Timeout,
    /// The agent is at a concurrency limit; retry later.
    Busy,
    /// The agent is shutting down.
    ShuttingDown,
    /// A bug or an unexpected condition in the agent.
    Internal,
    /// A code this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Timeout
                | ErrorCode::Busy
                | ErrorCode::ShuttingDown
                | ErrorCode::CommandFailed
                | ErrorCode::LeaseHeld
        )
    }
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// Stable code.
    pub code: ErrorCode,
    /// What happened, for people.
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The lease in force, for lease errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Box<LeaseInfo>>,
}

impl WireError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            lease: None,
        }
    }

    /// Names the field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Attaches the lease in force.
    pub fn with_lease(mut self, lease: LeaseInfo) -> Self {
        self.lease = Some(Box::new(lease));
        self
    }
}

impl From<NameError> for WireError {
    fn from(e: NameError) -> Self {
        let field = e.field.clone();
        WireError::new(ErrorCode::InvalidName, e.to_string()).with_field(field)
    }
}

/// Formats an error and its `source()` chain on one line: `outer: cause: root cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_strings() {
        let e = WireError::new(ErrorCode::StaleToken, "token 3 is stale");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":"stale_token","message":"token 3 is stale"}"#
        );
        let u: WireError =
            serde_json::from_str(r#"{"code":"from_the_future","message":"x"}"#).unwrap();
        assert_eq!(u.code, ErrorCode::Unknown);
    }
}
