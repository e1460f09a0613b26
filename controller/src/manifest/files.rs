//! Finding the manifest files of a directory tree, within bounds.

use std::path::{Path, PathBuf};

use super::{LoadError, MAX_FILES};

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
