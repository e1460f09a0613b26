//! Framing: bytes and boundaries only.
//!
//! Every frame is a 4-byte big-endian unsigned length `N` followed by `N` bytes of UTF-8 JSON.
//! `N` must be between 1 and [`MAX_FRAME_LEN`]; a larger announced length is refused as soon as
//! the 4 header bytes are read, before any buffer for the body is reserved.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

/// Largest frame body accepted or sent: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than [`MAX_FRAME_LEN`].
    #[error("frame of {announced} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced body length.
        announced: u64,
        /// The limit in force.
        max: usize,
    },
    /// The peer announced an empty frame.
    #[error("empty frame")]
    Empty,
    /// The stream ended part-way through a frame.
    #[error("connection closed in the middle of a frame ({have} of {want} bytes received)")]
    Truncated {
        /// Bytes of the frame (header included) received before EOF.
        have: usize,
        /// Bytes the frame needed (header included; 4 while the header is incomplete).
        want: usize,
    },
    /// An I/O error on the underlying stream.
    #[error("i/o error on the connection")]
    Io(#[from] io::Error),
}

/// A framed, buffered connection over any byte stream.
///
/// Reads keep a buffer of bytes received but not yet consumed, so a frame split across reads and
/// several frames in one read both work. Writes go through a `BufWriter` and are flushed once per
/// frame.
#[derive(Debug)]
pub struct Connection<S> {
    stream: BufWriter<S>,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> Self {
        Self {
            stream: BufWriter::new(stream),
            buffer: Vec::with_capacity(READ_CHUNK),
        }
    }

    /// Reads the next frame body.
    ///
    /// Returns `Ok(None)` on a clean end of stream (EOF between frames), and an error on EOF
    /// part-way through a frame. Cancel safety: cancel-safe, bytes already read stay buffered.
    pub async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            if let Some(frame) = self.parse_frame()? {
                return Ok(Some(frame));
            }
            // Reserve at most one chunk: the buffer grows with bytes received, never with a length
            // the peer merely announced.
            self.buffer.reserve(READ_CHUNK);
            let n = self.stream.get_mut().read_buf(&mut self.buffer).await?;
            if n == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated {
                        have: self.buffer.len(),
                        want: self.bytes_wanted(),
                    })
                };
            }
        }
    }

    /// Total bytes (header included) the frame at the head of the buffer needs.
    fn bytes_wanted(&self) -> usize {
        match self.announced_len() {
            Some(len) => HEADER_LEN + len as usize,
            None => HEADER_LEN,
        }
    }

    fn announced_len(&self) -> Option<u32> {
        let header: [u8; HEADER_LEN] = self.buffer.get(..HEADER_LEN)?.try_into().ok()?;
        Some(u32::from_be_bytes(header))
    }

    /// Takes one complete frame off the buffer, checking the announced length first.
    fn parse_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.announced_len() else {
            return Ok(None);
        };
        let len = len as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                announced: len as u64,
                max: MAX_FRAME_LEN,
            });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buffer[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buffer.drain(..HEADER_LEN + len);
        if self.buffer.capacity() > 4 * READ_CHUNK && self.buffer.len() < READ_CHUNK {
            // Give back the memory of a large frame once it has been consumed.
            self.buffer.shrink_to(READ_CHUNK);
        }
        Ok(Some(body))
    }

    /// Writes one frame and flushes it.
    pub async fn write_frame(&mut self, body: &[u8]) -> Result<(), FrameError> {
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                announced: body.len() as u64,
                max: MAX_FRAME_LEN,
            });
        }
        if body.is_empty() {
            return Err(FrameError::Empty);
        }
        let len = u32::try_from(body.len()).expect("bounded by MAX_FRAME_LEN");
        self.stream.write_all(&len.to_be_bytes()).await?;
        self.stream.write_all(body).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Shuts down the write half (TLS close_notify, then FIN).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// The underlying stream, for raw writes (tests of hostile peers).
    pub fn get_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }
}

/// Encodes one frame (header and body) into bytes, for tests and tools that write raw bytes.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::io::Builder;

    fn conn(mock: tokio_test::io::Mock) -> Connection<tokio_test::io::Mock> {
        Connection::new(mock)
    }

    #[tokio::test]
    async fn frame_split_across_reads_at_every_boundary() {
        let bytes = encode(br#"{"type":"ping","nonce":1}"#);
        for cut in 1..bytes.len() {
            let mock = Builder::new()
                .read(&bytes[..cut])
                .read(&bytes[cut..])
                .build();
            let mut c = conn(mock);
            let frame = c.read_frame().await.unwrap().unwrap();
            assert_eq!(frame, &bytes[HEADER_LEN..], "cut at {cut}");
            assert!(c.read_frame().await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn one_byte_at_a_time() {
        let bytes = encode(b"{\"a\":1}");
        let mut builder = Builder::new();
        for b in &bytes {
            builder.read(std::slice::from_ref(b));
        }
        let mut c = conn(builder.build());
        assert_eq!(c.read_frame().await.unwrap().unwrap(), b"{\"a\":1}");
        assert!(c.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn two_frames_in_one_read() {
        let mut bytes = encode(b"[1]");
        bytes.extend(encode(b"[2,3]"));
        let mut c = conn(Builder::new().read(&bytes).build());
        assert_eq!(c.read_frame().await.unwrap().unwrap(), b"[1]");
        assert_eq!(c.read_frame().await.unwrap().unwrap(), b"[2,3]");
        assert!(c.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_in_the_middle_of_a_body() {
        let bytes = encode(b"{\"abc\":1}");
        let mut c = conn(Builder::new().read(&bytes[..7]).build());
        match c.read_frame().await {
            Err(FrameError::Truncated { have: 7, want }) => assert_eq!(want, bytes.len()),
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn eof_in_the_middle_of_a_header() {
        let mut c = conn(Builder::new().read(&[0, 0]).build());
        match c.read_frame().await {
            Err(FrameError::Truncated { have: 2, want: 4 }) => {}
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn over_limit_refused_from_the_header_alone() {
        // Only the header arrives; the refusal must not wait for (or allocate) the body.
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let mut c = conn(Builder::new().read(&header).build());
        match c.read_frame().await {
            Err(FrameError::TooLarge { announced, .. }) => {
                assert_eq!(announced, MAX_FRAME_LEN as u64 + 1)
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(c.buffer.capacity() < 64 * 1024);
    }

    #[tokio::test]
    async fn exactly_the_limit_is_accepted() {
        let body = vec![b' '; MAX_FRAME_LEN];
        let bytes = encode(&body);
        let mut c = conn(Builder::new().read(&bytes).build());
        assert_eq!(c.read_frame().await.unwrap().unwrap().len(), MAX_FRAME_LEN);
    }

    #[tokio::test]
    async fn empty_frame_refused() {
        let mut c = conn(Builder::new().read(&[0, 0, 0, 0]).build());
        assert!(matches!(c.read_frame().await, Err(FrameError::Empty)));
    }

    #[tokio::test]
    async fn write_then_read_round_trip() {
        let (a, b) = tokio::io::duplex(64);
        let mut w = Connection::new(a);
        let mut r = Connection::new(b);
        let writer = tokio::spawn(async move {
            for i in 0..50u32 {
                w.write_frame(format!("{{\"n\":{i}}}").as_bytes())
                    .await
                    .unwrap();
            }
        });
        for i in 0..50u32 {
            let f = r.read_frame().await.unwrap().unwrap();
            assert_eq!(f, format!("{{\"n\":{i}}}").as_bytes());
        }
        writer.await.unwrap();
        assert!(r.read_frame().await.unwrap().is_none());
    }
}
