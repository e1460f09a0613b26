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

#[cfg(test)]
mod tests {
    use super::DeletionPolicy;

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
