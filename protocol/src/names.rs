//! Allow-lists for every name that may reach a command line or a certificate.
//!
//! Names are checked here, once, when they enter the system (a request on the wire, a manifest
//! field). The checked newtypes are the only way the agents accept a name for a command line, so an
//! unchecked string cannot reach `argv`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A name that failed its allow-list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {shown}: {reason}")]
pub struct NameError {
    /// The field the name was given in (`pool`, `image`, `client_id`, ...).
    pub field: String,
    /// The offending value, quoted and escaped, shortened when long.
    pub shown: String,
    /// Why it was refused, including the rule.
    pub reason: String,
}

/// The character rules a kind of name follows.
#[derive(Debug, Clone, Copy)]
struct Rule {
    what: &'static str,
    max_len: usize,
    lowercase_only: bool,
    extra: &'static [char],
    last_must_be_alnum: bool,
}

/// Pools, images, cephx ids and volume names: what Ceph accepts, minus anything a shell or an
/// argument parser could read as syntax.
const CEPH_NAME: Rule = Rule {
    what: "1-63 characters of a-z A-Z 0-9 . _ -, starting with a letter or digit",
    max_len: 63,
    lowercase_only: false,
    extra: &['.', '_', '-'],
    last_must_be_alnum: false,
};

/// Agent and controller names: DNS labels, because they are certificate subject names.
const DNS_LABEL: Rule = Rule {
    what: "a DNS label: 1-63 characters of a-z 0-9 -, starting and ending with a letter or digit",
    max_len: 63,
    lowercase_only: true,
    extra: &['-'],
    last_must_be_alnum: true,
};

fn shown(value: &str) -> String {
    const MAX_SHOWN: usize = 40;
    if value.chars().count() > MAX_SHOWN {
        let head: String = value.chars().take(MAX_SHOWN).collect();
        format!("{head:?}... ({} characters)", value.chars().count())
    } else {
        format!("{value:?}")
    }
}

fn check(field: &str, value: &str, rule: Rule) -> Result<(), NameError> {
    let fail = |reason: String| NameError {
        field: field.to_string(),
        shown: shown(value),
        reason: format!("{reason}; allowed: {}", rule.what),
    };
    if value.is_empty() {
        return Err(fail("empty".into()));
    }
    let len = value.chars().count();
    if len > rule.max_len {
        return Err(fail(format!("{len} characters is too long")));
    }
    for (i, c) in value.chars().enumerate() {
        let ok = if rule.lowercase_only {
            c.is_ascii_lowercase() || c.is_ascii_digit()
        } else {
            c.is_ascii_alphanumeric()
        } || (i > 0 && rule.extra.contains(&c));
        if !ok {
            return Err(fail(format!(
                "character {c:?} at position {i} is not allowed"
            )));
        }
    }
    if rule.last_must_be_alnum && !value.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(fail("must end with a letter or digit".into()));
    }
    Ok(())
}

macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value` against the allow-list; `field` names where it came from.
            pub fn parse(field: &str, value: &str) -> Result<Self, NameError> {
                check(field, value, $rule)?;
                Ok(Self(value.to_string()))
            }

            /// The checked name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                check(stringify!($name), &value, $rule)?;
                Ok(Self(value))
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<std::ffi::OsStr> for $name {
            fn as_ref(&self) -> &std::ffi::OsStr {
                self.0.as_ref()
            }
        }
    };
}

checked_name!(
    /// A RADOS pool name.
    PoolName,
    CEPH_NAME
);
checked_name!(
    /// An RBD image name.
    ImageName,
    CEPH_NAME
);
checked_name!(
    /// A cephx client id (the part after `client.`).
    CephClientId,
    CEPH_NAME
);
checked_name!(
    /// A unistor volume name (written into image metadata).
    VolumeName,
    CEPH_NAME
);

checked_name!(
    /// An RBD snapshot name (the part after `@`).
    SnapName,
    CEPH_NAME
);
checked_name!(
    /// The name of an agent or controller: a DNS label, as it appears in its certificate.
    PeerName,
    DNS_LABEL
);

/// RBD image features unistor may ask for (`rbd create --image-feature`).
pub const RBD_FEATURES: &[&str] = &[
    "layering",
    "exclusive-lock",
    "object-map",
    "fast-diff",
    "deep-flatten",
];

/// Checks an RBD feature name against [`RBD_FEATURES`].
pub fn check_rbd_feature(field: &str, value: &str) -> Result<(), NameError> {
    if RBD_FEATURES.contains(&value) {
        Ok(())
    } else {
        Err(NameError {
            field: field.to_string(),
            shown: shown(value),
            reason: format!(
                "not a known rbd feature; allowed: {}",
                RBD_FEATURES.join(", ")
            ),
        })
    }
}

/// Checks an RBD trash id (lowercase hex, as `rbd trash ls` prints it).
pub fn check_trash_id(field: &str, value: &str) -> Result<(), NameError> {
    let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    verdict(
        shaped(value, 32, hex, hex),
        field,
        value,
        "allowed: 1-32 lowercase hex digits",
    )
}

/// SPDK and SNAP object names (bdevs, controllers, clusters): the Ceph rule.
pub fn check_object_name(field: &str, value: &str) -> Result<(), NameError> {
    check(field, value, CEPH_NAME)
}

/// `value` is 1-`max` bytes, its first character passes `first` and every character `rest`.
fn shaped(
    value: &str,
    max: usize,
    first: impl Fn(char) -> bool,
    rest: impl Fn(char) -> bool,
) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value.chars().next().is_some_and(first)
        && value.chars().all(rest)
}

/// `Ok` when `ok`, else the refusal.
fn verdict(ok: bool, field: &str, value: &str, reason: &str) -> Result<(), NameError> {
    if ok {
        Ok(())
    } else {
        Err(refuse(field, value, reason))
    }
}

fn refuse(field: &str, value: &str, reason: &str) -> NameError {
    NameError {
        field: field.to_string(),
        shown: shown(value),
        reason: reason.to_string(),
    }
}

/// An NVMe Qualified Name: `nqn.` then 1-219 characters of a-z 0-9 . : - _.
pub fn check_nqn(field: &str, value: &str) -> Result<(), NameError> {
    let ok = value.len() <= 223
        && value.strip_prefix("nqn.").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".:-_".contains(c))
        });
    verdict(
        ok,
        field,
        value,
        "allowed: nqn. followed by a-z 0-9 . : - _, 223 bytes at most",
    )
}

/// A UUID in canonical lowercase 8-4-4-4-12 form.
pub fn check_uuid(field: &str, value: &str) -> Result<(), NameError> {
    let parts: Vec<&str> = value.split('-').collect();
    let ok = parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| {
            p.len() == n
                && p.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        });
    verdict(
        ok,
        field,
        value,
        "allowed: a lowercase UUID, 8-4-4-4-12 hex digits",
    )
}

/// A monitor address: `host:port` or `[v6]:port`, host of a-z A-Z 0-9 . -.
pub fn check_host_port(field: &str, value: &str) -> Result<(), NameError> {
    let bad = || {
        refuse(
            field,
            value,
            "allowed: host:port (IPv4, [IPv6] or a DNS name)",
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .map(|h| (h, true))
        .unwrap_or((host, false));
    let ok = match host {
        (h, true) => h.parse::<std::net::Ipv6Addr>().is_ok(),
        (h, false) => {
            !h.is_empty()
                && h.len() <= 253
                && !h.starts_with('-')
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }
    };
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A cephx secret: base64 of 1-128 bytes.
pub fn check_cephx_key(field: &str, value: &str) -> Result<(), NameError> {
    let b64 = |c: char| c.is_ascii_alphanumeric() || "+/=".contains(c);
    if shaped(value, 172, b64, b64) {
        return Ok(());
    }
    // Never echo a secret.
    Err(NameError {
        field: field.to_string(),
        shown: "(secret)".into(),
        reason: "allowed: base64".into(),
    })
}

/// A container image reference without tag: `registry/path/name` of a-z 0-9 . _ - / :port.
pub fn check_image_ref(field: &str, value: &str) -> Result<(), NameError> {
    let ok = shaped(
        value,
        255,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c),
    ) && !value.contains("..");
    verdict(
        ok,
        field,
        value,
        "allowed: a-z 0-9 . _ - / : (no tag), 255 characters at most",
    )
}

/// A container image tag: 1-128 characters of A-Z a-z 0-9 . _ -, not starting with . or -.
pub fn check_image_tag(field: &str, value: &str) -> Result<(), NameError> {
    let ok = shaped(
        value,
        128,
        |c| c.is_ascii_alphanumeric() || c == '_',
        |c| c.is_ascii_alphanumeric() || "._-".contains(c),
    );
    verdict(
        ok,
        field,
        value,
        "allowed: 1-128 characters of A-Z a-z 0-9 . _ -",
    )
}

/// An environment variable for SNAP's container: `NAME` of A-Z 0-9 _ and a printable value.
pub fn check_env(field: &str, name: &str, value: &str) -> Result<(), NameError> {
    let name_ok = shaped(
        name,
        64,
        |c| c.is_ascii_uppercase() || c == '_',
        |c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_',
    );
    if !name_ok {
        return Err(refuse(
            field,
            name,
            "allowed names: A-Z 0-9 _, starting with a letter or _",
        ));
    }
    if value.len() > 1024 || value.chars().any(|c| c.is_control()) {
        return Err(refuse(
            &format!("{field}.{name}"),
            value,
            "allowed values: printable, 1024 bytes at most",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const HOSTILE: &[&str] = &[
        "a;rm -rf /",
        "$(reboot)",
        "--help",
        "-x",
        "../x",
        "a/b",
        "",
        "a b",
        "a\nb",
        "é",
        "ｉｍｇ",
        "`id`",
        "a|b",
        "a&b",
        "a>b",
        "*",
        "a@b",
        "a\0b",
    ];

    #[test]
    fn hostile_names_are_refused_with_the_field_named() {
        for bad in HOSTILE {
            let e = PoolName::parse("pool", bad).unwrap_err();
            assert_eq!(e.field, "pool");
            assert!(e.to_string().starts_with("invalid pool "), "{e}");
            assert!(ImageName::parse("image", bad).is_err(), "{bad:?}");
            assert!(PeerName::parse("name", bad).is_err(), "{bad:?}");
        }
        let long = "a".repeat(300);
        let e = ImageName::parse("image", &long).unwrap_err();
        assert!(e.to_string().contains("300 characters"), "{e}");
        assert!(e.to_string().len() < 300, "long values are shortened: {e}");
    }

    #[test]
    fn ordinary_names_pass() {
        for good in ["rbd", "vol-01", "Pool_2", "img.v1", "a", &"b".repeat(63)] {
            PoolName::parse("pool", good).unwrap();
        }
        for good in ["ceph-1", "dpu-host07", "controller"] {
            PeerName::parse("name", good).unwrap();
        }
        assert!(PeerName::parse("name", "Upper").is_err());
        assert!(PeerName::parse("name", "trailing-").is_err());
        assert!(PoolName::parse("pool", &"b".repeat(64)).is_err());
    }

    #[test]
    fn deserializing_checks_too() {
        let r: Result<PoolName, _> = serde_json::from_str("\"a;b\"");
        assert!(r.is_err());
        let ok: PoolName = serde_json::from_str("\"rbd\"").unwrap();
        assert_eq!(ok.as_str(), "rbd");
    }

    #[test]
    fn dpu_fields() {
        check_nqn("nqn", "nqn.2022-10.io.nvda.nvme:0").unwrap();
        for bad in ["nqn.", "iqn.x", "nqn.A", "nqn.x;y", "nqn.$(x)"] {
            assert!(check_nqn("nqn", bad).is_err(), "{bad}");
        }
        check_uuid("uuid", "76210ea4-7920-40a0-a07b-8992a7443c76").unwrap();
        assert!(check_uuid("uuid", "76210EA4-7920-40a0-a07b-8992a7443c76").is_err());
        for ok in ["127.0.0.1:6789", "[::1]:3300", "mon-a.example:6789"] {
            check_host_port("mon", ok).unwrap();
        }
        for bad in ["127.0.0.1", "-x:1", "a b:1", "h:99999", "[zz]:1"] {
            assert!(check_host_port("mon", bad).is_err(), "{bad}");
        }
        let e = check_cephx_key("key", "secret with spaces").unwrap_err();
        assert!(
            !e.to_string().contains("spaces"),
            "never echo a secret: {e}"
        );
        check_image_ref("image", "nvcr.io/nvidia/doca/doca_snap").unwrap();
        assert!(check_image_ref("image", "nvcr.io/../x").is_err());
        check_image_tag("tag", "4.5.0-6-doca2.9.0").unwrap();
        assert!(check_image_tag("tag", "-x").is_err());
        check_env("env", "APP_ARGS", "-m 0xffff").unwrap();
        assert!(check_env("env", "lower", "x").is_err());
        assert!(check_env("env", "A", r"line\nbreak").is_ok());
        assert!(check_env(
            "env",
            "A",
            "line
break"
        )
        .is_err());
    }

    #[test]
    fn features_and_trash_ids() {
        check_rbd_feature("features", "layering").unwrap();
        assert!(check_rbd_feature("features", "--all").is_err());
        check_trash_id("trash_id", "10a2b3c4d5e6").unwrap();
        assert!(check_trash_id("trash_id", "10A;").is_err());
    }
}
