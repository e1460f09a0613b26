//! The metadata keys unistor writes on the images it creates and reads back in reports: the
//! contract between the ceph-agent (which writes them) and the controller (which decides
//! ownership and removal by them).

/// Which deployment (owner) manages the image.
pub const MANAGED_BY: &str = "unistor.managed-by";
/// The volume the image backs.
pub const VOLUME: &str = "unistor.volume";
/// What removal does (`Retain`, `Trash`, `Delete`); absent means `Retain`. Written by older
/// agents; newer ones keep the policy in the pool's index and report it under this key.
pub const POLICY: &str = "unistor.deletion-policy";
/// Trash retention in seconds (as [`POLICY`]).
pub const RETENTION: &str = "unistor.trash-retention-secs";
/// The declared snapshots unistor took of the image, comma-separated: only these (and the
/// scheduled ones, named [`SCHEDULED_PREFIX`]`<seconds>`) are ever removed by unistor.
pub const SNAPSHOTS: &str = "unistor.snapshots";
/// The start of a scheduled snapshot's name; the rest is the controller's clock when it was
/// taken, in seconds since the Unix epoch.
pub const SCHEDULED_PREFIX: &str = "auto-";

/// When scheduled snapshot `name` was taken (seconds since the epoch, by the clock of the
/// controller that took it); None for a name that is not a scheduled snapshot's.
pub fn scheduled_at(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SCHEDULED_PREFIX)?;
    if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The names in a [`SNAPSHOTS`] value.
pub fn snapshot_list(value: Option<&str>) -> impl Iterator<Item = &str> {
    value
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// What happens to the image when the volume is removed from the manifests.
///
/// One type from the manifest through the wire to the agent and back in reports: an unknown
/// name is an error wherever it is read, never a quiet `Retain`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum DeletionPolicy {
    /// Detach from the host; keep the image (default).
    #[default]
    Retain,
    /// Detach; move the image to the RBD trash for `trashRetention`.
    Trash,
    /// Detach; delete the image (also needs `--allow-delete` on apply).
    Delete,
}

impl DeletionPolicy {
    /// The name written on the wire and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retain => "Retain",
            Self::Trash => "Trash",
            Self::Delete => "Delete",
        }
    }
}

impl std::fmt::Display for DeletionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeletionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Retain" => Ok(Self::Retain),
            "Trash" => Ok(Self::Trash),
            "Delete" => Ok(Self::Delete),
            other => Err(format!("{other:?} is not Retain, Trash or Delete")),
        }
    }
}

/// An image's `unistor.*` metadata, as reported. The four keys unistor decides by are held
/// apart, at hand: a plan reads them for every volume, and a map of strings costs a search and
/// several memory fetches per key. Any other key is kept as it is. On the wire it is a plain
/// map of key to value, as `rbd image-meta` has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "BTreeMap<String, String>")]
pub struct ImageMeta {
    managed_by: Option<String>,
    volume: Option<String>,
    policy: Option<String>,
    retention: Option<String>,
    other: BTreeMap<String, String>,
    /// `policy` read when set: whether it names a policy, and which (derived: the wire carries
    /// the string only).
    policy_read: Option<Option<DeletionPolicy>>,
}

use std::collections::BTreeMap;

impl ImageMeta {
    /// [`MANAGED_BY`]: the deployment managing the image.
    pub fn managed_by(&self) -> Option<&str> {
        self.managed_by.as_deref()
    }

    /// [`VOLUME`]: the volume the image backs.
    pub fn volume(&self) -> Option<&str> {
        self.volume.as_deref()
    }

    /// [`POLICY`], as written (absent means `Retain`).
    pub fn policy(&self) -> Option<&str> {
        self.policy.as_deref()
    }

    /// [`RETENTION`], as written.
    pub fn retention(&self) -> Option<&str> {
        self.retention.as_deref()
    }

    /// Whether the image's policy is `p` (absent means `Retain`; a value that names no policy
    /// is none of them). Read when the value was set, not on every call.
    pub fn policy_is(&self, p: DeletionPolicy) -> bool {
        match self.policy_read {
            None => p == DeletionPolicy::Retain,
            Some(read) => read == Some(p),
        }
    }

    /// [`RETENTION`] in seconds, when it is set and a number.
    pub fn retention_secs(&self) -> Option<u64> {
        self.retention.as_deref().and_then(|r| r.parse().ok())
    }

    /// Reads `policy` again after it was set or removed.
    fn reread(&mut self) {
        self.policy_read = self.policy.as_deref().map(|p| p.parse().ok());
    }

    fn known(&self, key: &str) -> Option<&Option<String>> {
        match key {
            MANAGED_BY => Some(&self.managed_by),
            VOLUME => Some(&self.volume),
            POLICY => Some(&self.policy),
            RETENTION => Some(&self.retention),
            _ => None,
        }
    }

    fn known_mut(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            MANAGED_BY => Some(&mut self.managed_by),
            VOLUME => Some(&mut self.volume),
            POLICY => Some(&mut self.policy),
            RETENTION => Some(&mut self.retention),
            _ => None,
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        match self.known(key) {
            Some(slot) => slot.as_ref(),
            None => self.other.get(key),
        }
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key`; returns its previous value.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.known_mut(&key) {
            Some(slot) => {
                let old = slot.replace(value);
                self.reread();
                old
            }
            None => self.other.insert(key, value),
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        match self.known_mut(key) {
            Some(slot) => {
                let old = slot.take();
                self.reread();
                old
            }
            None => self.other.remove(key),
        }
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        [
            &self.managed_by,
            &self.volume,
            &self.policy,
            &self.retention,
        ]
        .into_iter()
        .filter(|v| v.is_some())
        .count()
            + self.other.len()
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key and value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let known = [
            (MANAGED_BY, &self.managed_by),
            (VOLUME, &self.volume),
            (POLICY, &self.policy),
            (RETENTION, &self.retention),
        ];
        let mut all: Vec<(&str, &str)> = known
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_deref()?)))
            .chain(self.other.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .collect();
        all.sort_unstable_by_key(|(k, _)| *k);
        all.into_iter()
    }
}

impl From<BTreeMap<String, String>> for ImageMeta {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for ImageMeta {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut meta = ImageMeta::default();
        for (k, v) in iter {
            meta.insert(k, v);
        }
        meta
    }
}

impl<const N: usize> From<[(String, String); N]> for ImageMeta {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl std::ops::Index<&str> for ImageMeta {
    type Output = String;
    fn index(&self, key: &str) -> &String {
        self.get(key)
            .unwrap_or_else(|| panic!("no metadata key {key:?}"))
    }
}

impl serde::Serialize for ImageMeta {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::DeletionPolicy;

    #[test]
    fn metadata_is_a_plain_map_on_the_wire_with_the_known_keys_at_hand() {
        let json = r#"{"unistor.deletion-policy":"Trash","unistor.managed-by":"me","unistor.other":"x","unistor.trash-retention-secs":"60","unistor.volume":"v"}"#;
        let m: super::ImageMeta = serde_json::from_str(json).unwrap();
        assert_eq!(m.managed_by(), Some("me"));
        assert_eq!(m.volume(), Some("v"));
        assert_eq!(m.policy(), Some("Trash"));
        assert_eq!(m.retention(), Some("60"));
        assert_eq!(m.retention_secs(), Some(60));
        assert!(m.policy_is(super::DeletionPolicy::Trash));
        assert!(!m.policy_is(super::DeletionPolicy::Retain));
        assert_eq!(m.get("unistor.other").map(String::as_str), Some("x"));
        assert_eq!(m.len(), 5);
        // Written back in key order, byte for byte.
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        let mut m = m;
        assert_eq!(m.remove(super::VOLUME).as_deref(), Some("v"));
        assert_eq!(m.volume(), None);
        assert!(!m.contains_key(super::VOLUME));
        assert_eq!(m.insert(super::VOLUME.into(), "w".into()), None);
        assert_eq!(m[super::VOLUME], "w");
        assert!(super::ImageMeta::default().is_empty());
        // Absent is Retain; a value that names no policy is none; a retention read again.
        assert!(super::ImageMeta::default().policy_is(super::DeletionPolicy::Retain));
        m.insert(super::POLICY.into(), "Shred".into());
        m.insert(super::RETENTION.into(), "soon".into());
        for p in [
            super::DeletionPolicy::Retain,
            super::DeletionPolicy::Trash,
            super::DeletionPolicy::Delete,
        ] {
            assert!(!m.policy_is(p));
        }
        assert_eq!(m.retention_secs(), None);
        m.remove(super::POLICY);
        assert!(m.policy_is(super::DeletionPolicy::Retain));
    }

    #[test]
    fn policies_round_trip_and_unknown_ones_are_errors() {
        for p in [
            DeletionPolicy::Retain,
            DeletionPolicy::Trash,
            DeletionPolicy::Delete,
        ] {
            assert_eq!(p.as_str().parse::<DeletionPolicy>(), Ok(p));
            let wire = serde_json::to_string(&p).unwrap();
            assert_eq!(wire, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<DeletionPolicy>(&wire).unwrap(), p);
        }
        assert!("retain".parse::<DeletionPolicy>().is_err());
        assert!(serde_json::from_str::<DeletionPolicy>("\"Trsh\"").is_err());
    }
}
