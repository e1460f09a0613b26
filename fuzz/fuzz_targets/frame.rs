//! The agents' frame decoder and message types: any bytes from a peer, split into reads of any
//! size. Frames are read until the stream ends or is refused; each that is a message must
//! survive a round trip (what unistor writes, it reads back the same).
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use protocol::frame::Connection;
use protocol::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The peer's bytes, handed out `step` at a time; writes go nowhere.
struct Peer<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let peer = Peer {
        data: rest,
        step: usize::from(first).max(1),
    };
    runtime().block_on(async {
        let mut conn = Connection::new(peer);
        while let Ok(Some(frame)) = conn.read_frame().await {
            if let Ok(m) = Message::from_bytes(&frame) {
                let bytes = m.to_bytes();
                let again = Message::from_bytes(&bytes).expect("what unistor writes, it reads");
                assert_eq!(again.to_bytes(), bytes, "a message survives a round trip");
            }
        }
    });
});
