//! A bdev's QoS rate limits applied to the simulated host's I/O, after SPDK v24.01's bdev QoS
//! (lib/bdev/bdev.c):
//!
//! - four limits: read+write I/Os per second, read+write bytes, read bytes, write bytes
//!   (`SPDK_BDEV_QOS_RW_IOPS_RATE_LIMIT`... in `qos_rpc_type`); reads and writes count, nothing
//!   else does (`bdev_qos_io_to_limit`: flushes pass);
//! - a quota per time slice of `SPDK_BDEV_QOS_TIMESLICE_IN_USEC` (1 ms): the limit times the
//!   slice, at least 1 I/O or 512 bytes (`bdev_qos_update_max_quota_per_timeslice`,
//!   `SPDK_BDEV_QOS_MIN_IO_PER_TIMESLICE`, `SPDK_BDEV_QOS_MIN_BYTE_PER_TIMESLICE`);
//! - an I/O goes when every limit that applies to it still has quota, and may overrun it (a
//!   debt the next slices pay, `bdev_qos_rw_queue_io` and `bdev_channel_poll_qos`); otherwise
//!   it waits, in order.
//!
//! One difference, for a timer that is not SPDK's busy poller: the quota refills continuously at
//! the limit's rate, capped at one slice's quota, instead of in whole slices by a poller that
//! runs every millisecond and drops what a slice left unused. Over any second both admit the
//! limit; a tokio timer woken a millisecond late would otherwise lose that slice's quota.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The slice (`SPDK_BDEV_QOS_TIMESLICE_IN_USEC`).
const SLICE: Duration = Duration::from_micros(1000);

/// The limits in SPDK's internal units: I/Os and bytes per second, 0 = none. Index order is
/// SPDK's: rw IOPS, rw bytes, r bytes, w bytes.
pub type Limits = [u64; 4];

/// One bdev's limiter, shared by every connection of the host to it.
#[derive(Debug, Default)]
pub struct Qos {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    limits: Limits,
    /// Quota left (negative: an overrun being paid back), per limit.
    left: [f64; 4],
    /// When `left` was last brought up to date.
    at: Option<Instant>,
}

impl Inner {
    /// One slice's quota of limit `i` (0: not limited).
    fn per_slice(&self, i: usize) -> f64 {
        let l = self.limits[i];
        if l == 0 {
            return 0.0;
        }
        let min = if i == 0 { 1.0 } else { 512.0 };
        (l as f64 * SLICE.as_secs_f64()).max(min)
    }

    fn refill(&mut self, now: Instant) {
        let dt = self
            .at
            .map_or(SLICE, |at| now.saturating_duration_since(at));
        self.at = Some(now);
        for i in 0..4 {
            let cap = self.per_slice(i);
            if cap == 0.0 {
                self.left[i] = 0.0;
                continue;
            }
            let rate = self.limits[i] as f64;
            self.left[i] = (self.left[i] + rate * dt.as_secs_f64()).min(cap);
        }
    }
}

impl Qos {
    /// Sets the limits (as `bdev_set_qos_limit` left them); unchanged limits keep their state.
    pub fn set(&self, limits: Limits) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.limits != limits {
            g.limits = limits;
            g.left = [0.0; 4];
            g.at = None;
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).limits
    }

    /// Waits until an I/O of `bytes` (a read, or a write) may go, and charges it.
    pub async fn admit(&self, read: bool, bytes: u64) {
        let delta = [
            1.0,
            bytes as f64,
            if read { bytes as f64 } else { 0.0 },
            if read { 0.0 } else { bytes as f64 },
        ];
        loop {
            let wait = {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                if g.limits == [0; 4] {
                    return;
                }
                g.refill(Instant::now());
                let applies = |i: usize| g.limits[i] > 0 && delta[i] > 0.0;
                let short = (0..4)
                    .filter(|&i| applies(i) && g.left[i] <= 0.0)
                    .map(|i| {
                        // Until this limit's quota is positive again.
                        Duration::from_secs_f64((-g.left[i] + 1e-9) / g.limits[i] as f64)
                    })
                    .max();
                match short {
                    None => {
                        for (i, d) in delta.iter().enumerate() {
                            if g.limits[i] > 0 {
                                g.left[i] -= d;
                            }
                        }
                        return;
                    }
                    Some(w) => w.max(Duration::from_micros(50)),
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the I/Os of `bytes` a saturating client gets through in `secs` of virtual time.
    async fn run(q: &Qos, read: bool, bytes: u64, secs: u64) -> u64 {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut n = 0;
        while Instant::now() < end {
            q.admit(read, bytes).await;
            n += 1;
        }
        n
    }

    /// On the paused clock (exact, not timed): an IOPS limit admits its rate; a byte limit its
    /// bytes; a read limit does not hold writes; lifting the limits lets everything through.
    #[tokio::test(start_paused = true)]
    async fn each_limit_admits_its_rate_and_only_its_kind() {
        let q = Qos::default();
        q.set([2000, 0, 0, 0]);
        let n = run(&q, true, 4096, 10).await;
        assert!(
            (19_990..=20_010).contains(&n),
            "{n} I/Os in 10 s at 2000 IOPS"
        );
        q.set([0, 0, 8 << 20, 0]);
        let n = run(&q, true, 65536, 10).await;
        let mib = n * 65536 / 10 / (1 << 20);
        assert!((7..=8).contains(&mib), "{mib} MiB/s read at 8");
        // Writes are not held by a read limit (bounded only by the loop's own time: none).
        let t = Instant::now();
        for _ in 0..10_000 {
            q.admit(false, 65536).await;
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "writes pass a read limit");
        // Both: the tighter one holds.
        q.set([1000, 8 << 20, 0, 0]);
        let n = run(&q, true, 4096, 10).await;
        assert!(
            (9_990..=10_010).contains(&n),
            "{n}: the IOPS limit holds (8 MiB/s allows more)"
        );
        let n = run(&q, true, 65536, 10).await;
        assert!(
            (1_270..=1_290).contains(&n),
            "{n}: the byte limit holds (128 of 64 KiB a second)"
        );
        q.set([0; 4]);
        let t = Instant::now();
        for _ in 0..10_000 {
            q.admit(true, 4096).await;
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "no limit, no wait");
    }

    /// An I/O larger than a slice's quota goes (an overrun), and the debt is paid by the next
    /// slices: a 1 MiB read under a 1 MiB/s limit every second.
    #[tokio::test(start_paused = true)]
    async fn an_overrun_is_paid_back() {
        let q = Qos::default();
        q.set([0, 1 << 20, 0, 0]);
        let n = run(&q, true, 1 << 20, 10).await;
        assert!((10..=11).contains(&n), "{n} MiB in 10 s at 1 MiB/s");
    }
}
