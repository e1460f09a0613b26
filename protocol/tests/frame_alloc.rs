//! An announced length over the limit is refused without allocating it.
//!
//! This test binary counts every allocation (its own global allocator), so it lives alone.

use std::alloc::System;

use protocol::frame::{Connection, FrameError};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tokio::io::AsyncWriteExt;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn one_gib_announcement_allocates_nothing_like_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut tx, rx) = tokio::io::duplex(4096);
        let mut conn = Connection::new(rx);
        // A 1 GiB announcement followed by some body bytes.
        tx.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        tx.write_all(&[b'x'; 512]).await.unwrap();
        let region = Region::new(GLOBAL);
        let err = conn.read_frame().await.unwrap_err();
        let stats = region.change();
        assert!(
            matches!(err, FrameError::TooLarge { announced, .. } if announced == 1 << 30),
            "{err:?}"
        );
        let total = stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize;
        assert!(
            total < 64 * 1024,
            "decoding a refused header allocated {total} bytes ({stats:?})"
        );
    });
}
