//! Finding and reading the manifest files of a directory tree, within bounds. Git carries
//! symbolic links and anyone with a commit can add one, so what is read is checked: only regular
//! files, inside the tree (a link is followed only when its target is a regular file inside the
//! tree), opened without blocking (a FIFO never waits for a writer), size checked before the
//! read and the read itself bounded.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{LoadError, MAX_FILES, MAX_FILE_BYTES};

/// Why a manifest file is not read.
#[derive(Debug, thiserror::Error)]
pub(super) enum Unread {
    /// An I/O error.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// A link that cannot be followed.
    #[error("a symbolic link that cannot be followed: {0}")]
    BrokenLink(std::io::Error),
    /// A link out of the tree.
    #[error("a symbolic link to {}, outside the manifest directory: not read", .0.display())]
    OutsideLink(PathBuf),
    /// A FIFO, a device, a socket, a directory...
    #[error("{0}, not a regular file: not read")]
    NotRegular(&'static str),
    /// Over the size bound.
    #[error("{0} bytes; manifest files are at most {MAX_FILE_BYTES}")]
    TooLarge(u64),
    /// Grew over the bound while read.
    #[error("grew past {MAX_FILE_BYTES} bytes while read; manifest files are at most that")]
    Grew,
}

/// Reads manifest file `p` of the tree whose canonical root is `root`; why not, when it is not
/// read.
pub(super) fn read_bounded(root: &Path, p: &Path) -> Result<String, Unread> {
    let listed = std::fs::symlink_metadata(p)?;
    let target = if listed.file_type().is_symlink() {
        let t = std::fs::canonicalize(p).map_err(Unread::BrokenLink)?;
        if !t.starts_with(root) {
            return Err(Unread::OutsideLink(t));
        }
        t
    } else {
        p.to_path_buf()
    };
    // Non-blocking: opening a FIFO would otherwise wait for a writer for ever. No following: a
    // link swapped in since the check is not taken.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&target)?;
    let m = f.metadata()?;
    let t = m.file_type();
    if !t.is_file() {
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Unread::NotRegular(kind));
    }
    if m.len() > MAX_FILE_BYTES {
        return Err(Unread::TooLarge(m.len()));
    }
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(Unread::Grew);
    }
    Ok(text)
}

pub(super) fn collect(dir: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<LoadError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(LoadError {
                file: dir.to_path_buf(),
                line: 0,
                field: String::new(),
                message: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        // Editors' and git's leftovers are not manifests.
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => collect(&p, out, errors),
            Ok(_) if name.ends_with(".yaml") || name.ends_with(".yml") => out.push(p),
            _ => {}
        }
        if out.len() > MAX_FILES {
            return;
        }
    }
}
