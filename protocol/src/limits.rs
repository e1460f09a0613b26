//! Bounds on the numbers that reach a cluster or SNAP, checked where they enter: the manifest
//! loader, and each agent on receipt of a command. A value outside them is an invalid argument,
//! never a command that fails half way (a retryable error, an index entry left behind).

/// The largest volume (and RBD image): 1 PiB. RBD itself would take more; no NVMe namespace
/// served from one image needs it, and the bound keeps every size, in bytes, MiB or blocks,
/// far from overflowing.
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// The longest a trashed image is protected: ten years (`rbd trash mv --expires-at` takes a
/// date; a larger number overflows the date arithmetic).
pub const MAX_RETENTION_SECS: u64 = 10 * 365 * 86_400;

/// Checks a size in bytes against [`MAX_VOLUME_BYTES`]; the message names the bound.
pub fn check_volume_bytes(bytes: u64) -> Result<(), String> {
    if bytes > MAX_VOLUME_BYTES {
        return Err(format!(
            "{bytes} bytes is more than the largest volume, {MAX_VOLUME_BYTES} bytes (1 PiB)"
        ));
    }
    Ok(())
}

/// Checks a trash retention against [`MAX_RETENTION_SECS`].
pub fn check_retention_secs(secs: u64) -> Result<(), String> {
    if secs > MAX_RETENTION_SECS {
        return Err(format!(
            "{secs} s is longer than the longest trash retention, {MAX_RETENTION_SECS} s (10 years)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_take_their_own_value_and_refuse_one_more() {
        assert!(check_volume_bytes(MAX_VOLUME_BYTES).is_ok());
        assert!(check_volume_bytes(MAX_VOLUME_BYTES + 1).is_err());
        assert!(check_volume_bytes(u64::MAX - (1 << 20) + 1).is_err());
        assert!(check_retention_secs(MAX_RETENTION_SECS).is_ok());
        assert!(check_retention_secs(u64::MAX).is_err());
    }
}
