//! YAML: documents split at `---` with their first line, a pre-scan of a YAML parser's events
//! (anchors, aliases, depth), typed parsing that names the field, and a field's line.

use std::path::Path;

use super::{Document, LoadError, Object};

/// One document's text and position.
pub(super) struct Doc<'a> {
    pub(super) file: &'a Path,
    pub(super) first_line: usize,
    pub(super) text: String,
}

/// Splits a file into documents at `---` lines, keeping each document's first line.
pub(super) fn split_documents<'a>(file: &'a Path, text: &str) -> Vec<Doc<'a>> {
    let mut docs = vec![];
    let mut cur = String::new();
    let mut first = 1;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            if !cur.trim().is_empty() {
                docs.push(Doc {
                    file,
                    first_line: first,
                    text: std::mem::take(&mut cur),
                });
            }
            cur.clear();
            first = i + 2;
            continue;
        }
        if line == "..." {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.trim().is_empty() {
        docs.push(Doc {
            file,
            first_line: first,
            text: cur,
        });
    }
    docs
}

/// Collections nested deeper than this are refused before deserializing.
pub(super) const MAX_DEPTH: usize = 32;

/// Looks, with a YAML parser's events (`yaml-rust2`), for what a manifest never needs and a
/// hostile document uses: anchors (`&a`) and aliases (`*a`) — alias expansion is how "billion
/// laughs" documents blow up — and collections nested deeper than [`MAX_DEPTH`], flow or block.
/// Events, not text: `note: storage & compute` is a plain scalar, `"*1Gi"` a quoted one. Stops at
/// the first finding (the parser does not recurse and never expands an alias), so hostile input
/// costs one pass at most. Returns the 1-based line and the reason (a syntax error too).
pub(super) fn prescan(text: &str) -> Option<(usize, String)> {
    use yaml_rust2::parser::{Event, Parser};
    const ANCHORS: &str = "YAML anchors and aliases are not allowed in manifests";
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(t) => t,
            // The scanner's own nesting limit (it counts flow levels in a byte).
            Err(e) if e.info().contains("recursion limit") => {
                return Some((
                    e.marker().line(),
                    format!("nested deeper than {MAX_DEPTH} levels"),
                ))
            }
            // Not YAML: said here, with the parser's reason, rather than handing a document
            // that defeats one parser to another.
            Err(e) => return Some((e.marker().line(), format!("not valid YAML: {}", e.info()))),
        };
        match event {
            Event::StreamEnd => return None,
            Event::Alias(_) => return Some((mark.line(), ANCHORS.into())),
            Event::Scalar(_, _, anchor, _) if anchor > 0 => {
                return Some((mark.line(), ANCHORS.into()))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if anchor > 0 {
                    return Some((mark.line(), ANCHORS.into()));
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some((
                        mark.line(),
                        format!("nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
}

/// Finds the line of `path` (keys from the document's root) in `text`; 0-based.
pub(super) fn locate(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut parent: isize = -1;
    let mut found = None;
    for key in path {
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(start) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let indent = (l.len() - t.len()) as isize;
            if found.is_some() && indent <= parent {
                break;
            }
            let t = t.strip_prefix("- ").unwrap_or(t);
            if t.starts_with(&format!("{key}:")) {
                hit = Some((i, indent));
                break;
            }
        }
        match hit {
            Some((i, indent)) => {
                found = Some(i);
                start = i + 1;
                parent = indent;
            }
            None => break,
        }
    }
    found
}

/// Parses one document: YAML first (syntax errors carry their line), then the typed kind through
/// `serde_path_to_error`, so that type errors name the field, whose line is then looked up.
pub(super) fn parse_document(doc: &Doc<'_>) -> Result<Document, LoadError> {
    let fail = |line: usize, field: String, message: String| LoadError {
        file: doc.file.to_path_buf(),
        line,
        field,
        message,
    };
    let value: serde_yaml::Value = serde_yaml::from_str(&doc.text).map_err(|e| {
        let line = e
            .location()
            .map(|l| doc.first_line + l.line() - 1)
            .unwrap_or(doc.first_line);
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        fail(line, String::new(), msg)
    })?;
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .map(str::to_string);
    let at = |path: &str, extra: Option<&str>| {
        let mut keys: Vec<&str> = path
            .split('.')
            .filter(|k| !k.is_empty() && *k != "?")
            .collect();
        keys.extend(extra);
        doc.first_line + locate(&doc.text, &keys).unwrap_or(0)
    };
    fn typed<S: serde::de::DeserializeOwned>(
        v: serde_yaml::Value,
    ) -> Result<Object<S>, serde_path_to_error::Error<serde_yaml::Error>> {
        let mut mapping = v;
        if let Some(m) = mapping.as_mapping_mut() {
            m.remove("kind");
        }
        serde_path_to_error::deserialize(mapping)
    }
    let result = match kind.as_deref() {
        Some("CephCluster") => typed(value).map(Document::CephCluster),
        Some("Dpu") => typed(value).map(Document::Dpu),
        Some("Volume") => typed(value).map(Document::Volume),
        Some(other) => {
            return Err(fail(
                at("kind", None),
                "kind".into(),
                format!("unknown kind {other:?}: expected CephCluster, Dpu or Volume"),
            ))
        }
        None => {
            return Err(fail(
                doc.first_line,
                "kind".into(),
                "missing: every document needs a kind (CephCluster, Dpu or Volume)".into(),
            ))
        }
    };
    result.map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        // For an unknown field, point at the field itself.
        let unknown = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next());
        let field = match unknown {
            Some(u) if path == "." || path.is_empty() => u.to_string(),
            // Some paths already end at the unknown key.
            Some(u) if path == u || path.ends_with(&format!(".{u}")) => path.clone(),
            Some(u) => format!("{path}.{u}"),
            None => path.clone(),
        };
        fail(at(&path, unknown), field, msg)
    })
}
