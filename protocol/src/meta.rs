//! The metadata keys unistor writes on the images it creates and reads back in reports: the
//! contract between the ceph-agent (which writes them) and the controller (which decides
//! ownership and removal by them).

/// Which deployment (owner) manages the image.
pub const MANAGED_BY: &str = "unistor.managed-by";
/// The volume the image backs.
pub const VOLUME: &str = "unistor.volume";
/// What removal does (`Retain`, `Trash`, `Delete`); absent means `Retain`. Written by older
/// agents; newer ones keep the policy in the pool's index and report it under this key.
pub const POLICY: &str = "unistor.deletion-policy";
/// Trash retention in seconds (as [`POLICY`]).
pub const RETENTION: &str = "unistor.trash-retention-secs";
