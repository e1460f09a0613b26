//! The wall clock of unistor's processes: the system's, unless a test moves it.
//!
//! Nothing that decides safety reads the wall clock: leases, heartbeats and deadlines run on the
//! monotonic clock (`tokio::time::Instant`), so a clock that jumps neither ends nor extends a
//! lease. The wall clock is read for certificate validity (rustls asks [`WallClock`]) and for
//! the timestamps records carry. Certificates start being valid one hour before they are issued
//! (`tls::issue`), so a clock up to an hour behind the CA's accepts them.
//!
//! The seam: when `UNISTOR_CLOCK_SKEW_FILE` names a file, its content (signed seconds, e.g.
//! `300` or `-300`) is added to the system clock, read again at every look, so a test can jump
//! a running process's clock (the chaos suite's clock loop). Unset, it costs nothing.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use rustls_pki_types::UnixTime;

const SKEW_FILE: &str = "UNISTOR_CLOCK_SKEW_FILE";

fn skew_file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| {
        let f = std::env::var_os(SKEW_FILE).map(PathBuf::from);
        if let Some(f) = &f {
            tracing::warn!(file = %f.display(), "The wall clock is shifted by this file's seconds (a test seam).");
        }
        f
    })
    .as_ref()
}

/// The shift now, in seconds (0 without the seam, or when its file is absent or garbled).
pub fn skew_secs() -> i64 {
    skew_file()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

/// The wall clock.
pub fn now() -> SystemTime {
    let t = SystemTime::now();
    match skew_secs() {
        0 => t,
        s if s > 0 => t + Duration::from_secs(s.unsigned_abs()),
        s => t - Duration::from_secs(s.unsigned_abs()),
    }
}

/// Milliseconds since the Unix epoch, on [`now`].
pub fn unix_ms() -> u64 {
    now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// [`now`] for rustls: certificate validity is judged on it.
#[derive(Debug)]
pub struct WallClock;

impl rustls::time_provider::TimeProvider for WallClock {
    fn current_time(&self) -> Option<UnixTime> {
        now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::time_provider::TimeProvider;

    #[test]
    fn without_the_seam_it_is_the_system_clock() {
        // The test process does not set UNISTOR_CLOCK_SKEW_FILE.
        assert_eq!(skew_secs(), 0);
        let a = SystemTime::now();
        let b = now();
        assert!(b.duration_since(a).unwrap_or_default() < Duration::from_secs(5));
        let rustls_now = WallClock.current_time().unwrap().as_secs();
        let sys = a.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert!(rustls_now.abs_diff(sys) < 5);
    }
}
