//! Finding and reading the manifest files of a directory tree, within bounds. Git carries
//! symbolic links and anyone with a commit can add one, so what is read is checked: only regular
//! files, inside the tree (a link is followed only when its target is a regular file inside the
//! tree), opened without blocking (a FIFO never waits for a writer), size checked before the
//! read and the read itself bounded.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{LoadError, MAX_FILES, MAX_FILE_BYTES};

/// Reads manifest file `p` of the tree whose canonical root is `root`; why not, when it is not
/// read.
pub(super) fn read_bounded(root: &Path, p: &Path) -> Result<String, String> {
    let listed = std::fs::symlink_metadata(p).map_err(|e| format!("cannot read: {e}"))?;
    let target = if listed.file_type().is_symlink() {
        let t = std::fs::canonicalize(p)
            .map_err(|e| format!("a symbolic link that cannot be followed: {e}"))?;
        if !t.starts_with(root) {
            return Err(format!(
                "a symbolic link to {}, outside the manifest directory: not read",
                t.display()
            ));
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
        .open(&target)
        .map_err(|e| format!("cannot read: {e}"))?;
    let m = f.metadata().map_err(|e| format!("cannot read: {e}"))?;
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
        return Err(format!("{kind}, not a regular file: not read"));
    }
    if m.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} bytes; manifest files are at most {MAX_FILE_BYTES}",
            m.len()
        ));
    }
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "grew past {MAX_FILE_BYTES} bytes while read; manifest files are at most that"
        ));
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
