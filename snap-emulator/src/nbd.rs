//! The simulated host's view of one NVMe namespace: an NBD server (the protocol of
//! `doc/proto.md` in github.com/NetworkBlockDevice/nbd, fixed newstyle) on a Unix socket, which
//! `qemu-io`, `qemu-img` and `qemu-nbd` (qemu-utils) connect to as `nbd+unix:///?socket=PATH`.
//! Reads and writes go to the namespace's bdev: through the emulator's librbd handle into the
//! image in real-Ceph mode, into memory otherwise.
//!
//! What is served: the handshake with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`/`NBD_OPT_GO`
//! (answering `NBD_INFO_EXPORT`), `NBD_OPT_LIST` and `NBD_OPT_ABORT`, every other option
//! `NBD_REP_ERR_UNSUP` (so clients fall back to simple replies); then `READ`, `WRITE` (with
//! `FUA`), `FLUSH` and `DISC`. Any export name is the device. The size is the bdev's at the
//! handshake, as a host sees a namespace's size when it (re)reads it.
//!
//! The protocol is small and the emulator needs it async, counted per connection (whether the
//! host holds the device open feeds unistor's in-use gate) and tied to the namespace's lifetime,
//! which the synchronous `nbd` crate does not offer; so it is written here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use ceph_lib::OpenImage;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
/// `NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA`.
const TRANSMISSION_FLAGS: u16 = 1 | (1 << 2) | (1 << 3);

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Largest option payload read (names are at most 4 KiB by the protocol).
const MAX_OPTION: u32 = 64 * 1024;
/// Largest read or write request served (qemu sends at most 32 MiB).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Bytes a bdev keeps in memory when no real cluster backs it (simulation without Ceph).
#[derive(Debug, Default)]
pub struct MemDisk {
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

const PAGE: u64 = 4096;

impl MemDisk {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = pages
                .get(&(at / PAGE))
                .map_or(0, |p| p[(at % PAGE) as usize]);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter().enumerate() {
            let at = offset + i as u64;
            let page = pages
                .entry(at / PAGE)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            page[(at % PAGE) as usize] = *b;
        }
    }
}

/// Where a device's blocks are.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The bdev's image, through its librbd handle.
    Rbd(Arc<OpenImage>),
    /// Memory (no real cluster).
    Memory(Arc<MemDisk>),
}

impl Backend {
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ()> {
        let mut buf = vec![0u8; len];
        match self {
            Self::Memory(m) => {
                m.read(offset, &mut buf);
                Ok(buf)
            }
            Self::Rbd(img) => {
                blocking(img, move |img| img.read_at(offset, &mut buf).map(|_| buf)).await
            }
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), ()> {
        match self {
            Self::Memory(m) => {
                m.write(offset, &data);
                Ok(())
            }
            Self::Rbd(img) => blocking(img, move |img| img.write_at(offset, &data)).await,
        }
    }

    async fn flush(&self) -> Result<(), ()> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Rbd(img) => blocking(img, |img| img.flush()).await,
        }
    }
}

/// Runs a librbd call off the async threads; any failure is the device's I/O error.
async fn blocking<T: Send + 'static>(
    img: &Arc<OpenImage>,
    call: impl FnOnce(&OpenImage) -> Result<T, ceph_lib::LibError> + Send + 'static,
) -> Result<T, ()> {
    let img = img.clone();
    match tokio::task::spawn_blocking(move || call(&img)).await {
        Ok(Ok(v)) => Ok(v),
        _ => Err(()),
    }
}

/// What a client is served: the device's size now and its blocks.
#[derive(Debug, Clone)]
pub struct Export {
    /// Bytes.
    pub size: u64,
    /// The blocks.
    pub backend: Backend,
    /// The bdev's QoS limits, paced on every read and write.
    pub qos: Arc<crate::qos::Qos>,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client left during the handshake (or aborted it).
    Handshake,
    /// The client disconnected after using the device.
    Done,
}

/// Serves one client: the handshake, then (when it asks for the device) transmission.
/// `export` is asked for the device when the client picks it; `opened` runs once the client
/// entered transmission (the device is open), before the first request.
pub async fn serve<S>(
    mut s: S,
    export: impl Fn() -> Option<Export>,
    opened: impl FnOnce(),
) -> std::io::Result<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_u64(NBDMAGIC).await?;
    s.write_u64(IHAVEOPT).await?;
    s.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let dev = loop {
        if s.read_u64().await? != IHAVEOPT {
            return Ok(End::Handshake);
        }
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION {
            return Ok(End::Handshake);
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                // No way to answer an error here: an unknown device closes the connection.
                let Some(dev) = export() else {
                    return Ok(End::Handshake);
                };
                s.write_u64(dev.size).await?;
                s.write_u16(TRANSMISSION_FLAGS).await?;
                if !no_zeroes {
                    s.write_all(&[0u8; 124]).await?;
                }
                break dev;
            }
            OPT_ABORT => {
                reply(&mut s, opt, REP_ACK, &[]).await?;
                return Ok(End::Handshake);
            }
            OPT_LIST => {
                // One export, the default (empty) name.
                reply(&mut s, opt, REP_SERVER, &0u32.to_be_bytes()).await?;
                reply(&mut s, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                if !well_formed_info(&data) {
                    reply(&mut s, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let Some(dev) = export() else {
                    reply(&mut s, opt, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&dev.size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                reply(&mut s, opt, REP_INFO, &info).await?;
                reply(&mut s, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    break dev;
                }
            }
            _ => reply(&mut s, opt, REP_ERR_UNSUP, &[]).await?,
        }
    };
    s.flush().await?;
    opened();
    transmission(&mut s, &dev).await?;
    Ok(End::Done)
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: a name length, the name, a count of info requests, each two
/// bytes.
fn well_formed_info(d: &[u8]) -> bool {
    if d.len() < 6 {
        return false;
    }
    let name = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    let Some(rest) = d.get(4 + name..) else {
        return false;
    };
    rest.len() >= 2 && rest.len() == 2 + 2 * u16::from_be_bytes([rest[0], rest[1]]) as usize
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    s.write_u64(REPLY_MAGIC).await?;
    s.write_u32(opt).await?;
    s.write_u32(kind).await?;
    s.write_u32(data.len() as u32).await?;
    s.write_all(data).await?;
    s.flush().await
}

async fn transmission<S>(s: &mut S, dev: &Export) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let magic = match s.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Ok(());
        }
        let flags = s.read_u16().await?;
        let kind = s.read_u16().await?;
        let handle = s.read_u64().await?;
        let offset = s.read_u64().await?;
        let len = s.read_u32().await?;
        let in_bounds = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= dev.size);
        match kind {
            CMD_READ => {
                if !in_bounds || len > MAX_REQUEST {
                    simple_reply(s, EINVAL, handle, &[]).await?;
                    continue;
                }
                dev.qos.admit(true, u64::from(len)).await;
                match dev.backend.read(offset, len as usize).await {
                    Ok(data) => simple_reply(s, 0, handle, &data).await?,
                    Err(()) => simple_reply(s, EIO, handle, &[]).await?,
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    // The payload cannot be skipped safely: end the connection.
                    return Ok(());
                }
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).await?;
                if !in_bounds {
                    simple_reply(s, ENOSPC, handle, &[]).await?;
                    continue;
                }
                dev.qos.admit(false, u64::from(len)).await;
                let mut r = dev.backend.write(offset, data).await;
                if r.is_ok() && flags & CMD_FLAG_FUA != 0 {
                    r = dev.backend.flush().await;
                }
                simple_reply(s, if r.is_ok() { 0 } else { EIO }, handle, &[]).await?;
            }
            CMD_FLUSH => {
                let r = dev.backend.flush().await;
                simple_reply(s, if r.is_ok() { 0 } else { EIO }, handle, &[]).await?;
            }
            CMD_DISC => {
                let _ = dev.backend.flush().await;
                return Ok(());
            }
            _ => simple_reply(s, EINVAL, handle, &[]).await?,
        }
    }
}

async fn simple_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    error: u32,
    handle: u64,
    data: &[u8],
) -> std::io::Result<()> {
    s.write_u32(SIMPLE_REPLY_MAGIC).await?;
    s.write_u32(error).await?;
    s.write_u64(handle).await?;
    s.write_all(data).await?;
    s.flush().await
}
