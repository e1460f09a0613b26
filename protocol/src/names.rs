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
    if !value.is_empty()
        && value.len() <= 32
        && value
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        Ok(())
    } else {
        Err(NameError {
            field: field.to_string(),
            shown: shown(value),
            reason: "allowed: 1-32 lowercase hex digits".into(),
        })
    }
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
    fn features_and_trash_ids() {
        check_rbd_feature("features", "layering").unwrap();
        assert!(check_rbd_feature("features", "--all").is_err());
        check_trash_id("trash_id", "10a2b3c4d5e6").unwrap();
        assert!(check_trash_id("trash_id", "10A;").is_err());
    }
}
