//! Init files: one command per line, as `snap_rpc.py` takes them without the script name
//! (`nvme_subsystem_create --nqn nqn.2022-10.io.nvda.nvme:0`). `--key value` becomes a JSON
//! param (`-` in keys becomes `_`; numbers and booleans are typed); a `--flag` without a value is
//! `true`. Blank lines and `#` comments are skipped.

use serde_json::{Map, Value};

/// Parses one line into a method and its params; `None` for blank lines and comments.
pub fn parse_line(line: &str) -> Option<(String, Value)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut words = line.split_whitespace().peekable();
    let method = words.next()?.to_string();
    let mut params = Map::new();
    while let Some(w) = words.next() {
        let Some(key) = w.strip_prefix("--").or_else(|| w.strip_prefix('-')) else {
            continue;
        };
        let key = key.replace('-', "_");
        let value = match words.peek() {
            Some(v) if !v.starts_with('-') || v.parse::<i64>().is_ok() => {
                let v = words.next().expect("peeked");
                serde_json::from_str::<Value>(v)
                    .ok()
                    .filter(|j| j.is_number() || j.is_boolean())
                    .unwrap_or_else(|| Value::String(v.to_string()))
            }
            _ => Value::Bool(true),
        };
        params.insert(key, value);
    }
    let params = if params.is_empty() {
        Value::Null
    } else {
        Value::Object(params)
    };
    Some((method, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_become_requests() {
        assert_eq!(parse_line("  # comment"), None);
        assert_eq!(parse_line(""), None);
        assert_eq!(
            parse_line("nvme_controller_create --nqn nqn.2022-10.io.nvda.nvme:0 --ctrl NVMeCtrl1 --pf_id 0 --admin_only"),
            Some((
                "nvme_controller_create".into(),
                json!({"nqn": "nqn.2022-10.io.nvda.nvme:0", "ctrl": "NVMeCtrl1", "pf_id": 0, "admin_only": true})
            ))
        );
        assert_eq!(
            parse_line("spdk_get_version"),
            Some(("spdk_get_version".into(), Value::Null))
        );
    }
}
