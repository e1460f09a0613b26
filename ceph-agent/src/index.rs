//! A pool's unistor index as the agent holds it, and how changes to it are grouped into as few
//! `rados` commands as possible.
//!
//! The index is the omap of the RADOS object `unistor.index` in each pool: one listing
//! (`rados listomapvals`) reads it whole. Each managed image has one entry ([`IndexValue`]: owner,
//! volume, policy, features), stored in one of two kinds of key:
//! - its own key, named after the image (what agents before batches wrote, still read and updated);
//! - a batch key (`~b.<time>.<n>`, a name no image can have, so older agents skip it) whose value
//!   is a JSON map of up to [`BATCH_MAX`] images to their entries.
//!
//! The `rados` CLI sets one omap key per process, and a process costs about as much CPU as the
//! `rbd import` that creates an image; so new entries go into the open batch key, and the writes
//! of concurrent creates are group-committed: each waits until a flush that includes its entry
//! has written the dirty keys, one command per key however many entries changed in it. A burst of
//! creates costs one index command per flush instead of one per image.
//!
//! This module is pure: it decides what to write; [`crate::ceph::Ceph`] runs the commands.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::ceph::IndexValue;

/// Entries per batch key: its value stays small (about 150 bytes an entry) while a flush
/// rewrites it whole.
pub const BATCH_MAX: usize = 64;
/// What every batch key starts with (`~` is not allowed in image names).
pub const BATCH_PREFIX: &str = "~b.";

/// One key to write: its new value, or `None` to remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyWrite {
    /// The omap key.
    pub key: String,
    /// Its value, or `None` when it is to be removed.
    pub value: Option<String>,
}

/// A pool's index in memory: the entries, where each lives, and the keys not yet written.
#[derive(Debug, Default)]
pub struct PoolIndex {
    /// Key to the entries stored in it (a single entry for an image's own key).
    keys: BTreeMap<String, BTreeMap<String, IndexValue>>,
    /// Image to the key its entry lives in.
    home: HashMap<String, String>,
    /// Keys changed since the last flush took them.
    dirty: BTreeSet<String>,
    /// The batch key new entries go into, while it has room.
    open: Option<String>,
    /// Raised by every change.
    version: u64,
    /// Every change up to this version has been written.
    durable: u64,
    /// Makes batch keys this process opens distinct.
    prefix: String,
    opened: u64,
}

impl PoolIndex {
    /// An index read from a listing (omap key to raw value); `prefix` makes the names of the
    /// batch keys this process opens unique (for example its start time).
    pub fn from_listing(listing: BTreeMap<String, Vec<u8>>, prefix: &str) -> Self {
        let mut ix = Self {
            prefix: prefix.to_string(),
            ..Self::default()
        };
        // Own keys first, so that an image named both in its own key and in a batch (a batch
        // whose rewrite failed after the image moved) is read from its own key.
        let (batches, own): (Vec<_>, Vec<_>) = listing
            .into_iter()
            .partition(|(k, _)| k.starts_with(BATCH_PREFIX));
        for (key, raw) in own {
            ix.home.insert(key.clone(), key.clone());
            ix.keys.insert(
                key.clone(),
                BTreeMap::from([(key, IndexValue::parse(&raw))]),
            );
        }
        for (key, raw) in batches {
            // A batch that does not parse is kept as it is (never rewritten, never lost).
            let Ok(entries) = serde_json::from_slice::<BTreeMap<String, IndexValue>>(&raw) else {
                tracing::warn!(key, "An index batch key does not parse; left alone.");
                continue;
            };
            let mut mine = BTreeMap::new();
            for (image, value) in entries {
                if !ix.home.contains_key(&image) {
                    ix.home.insert(image.clone(), key.clone());
                    mine.insert(image, value);
                }
            }
            ix.keys.insert(key, mine);
        }
        ix
    }

    /// Every entry, by image name.
    pub fn entries(&self) -> BTreeMap<String, IndexValue> {
        self.home
            .iter()
            .filter_map(|(image, key)| {
                Some((image.clone(), self.keys.get(key)?.get(image)?.clone()))
            })
            .collect()
    }

    /// One image's entry.
    pub fn get(&self, image: &str) -> Option<&IndexValue> {
        self.keys.get(self.home.get(image)?)?.get(image)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.home.len()
    }

    /// Whether it has no entry.
    pub fn is_empty(&self) -> bool {
        self.home.is_empty()
    }

    /// Sets an image's entry; returns the version a flush must reach for it to be written.
    /// An unchanged entry costs nothing.
    pub fn set(&mut self, image: &str, value: IndexValue) -> u64 {
        if self.get(image) == Some(&value) {
            return self.version;
        }
        let key = match self.home.get(image) {
            Some(k) => k.clone(),
            None => {
                let key = self.open_batch();
                self.home.insert(image.to_string(), key.clone());
                key
            }
        };
        self.keys
            .entry(key.clone())
            .or_default()
            .insert(image.to_string(), value);
        self.changed(key)
    }

    /// Removes an image's entry; returns the version a flush must reach.
    pub fn remove(&mut self, image: &str) -> u64 {
        let Some(key) = self.home.remove(image) else {
            return self.version;
        };
        if let Some(entries) = self.keys.get_mut(&key) {
            entries.remove(image);
        }
        self.changed(key)
    }

    fn open_batch(&mut self) -> String {
        if let Some(k) = &self.open {
            if self.keys.get(k).map_or(0, BTreeMap::len) < BATCH_MAX {
                return k.clone();
            }
        }
        // A name no key of the pool has (a listing read again later starts counting anew).
        let key = loop {
            self.opened += 1;
            let key = format!("{BATCH_PREFIX}{}.{}", self.prefix, self.opened);
            if !self.keys.contains_key(&key) {
                break key;
            }
        };
        self.open = Some(key.clone());
        key
    }

    fn changed(&mut self, key: String) -> u64 {
        self.dirty.insert(key);
        self.version += 1;
        self.version
    }

    /// Whether changes up to `version` are written.
    pub fn durable(&self, version: u64) -> bool {
        self.durable >= version
    }

    /// Whether some change is not written yet.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Takes the writes a flush must make, and the version they bring it to.
    pub fn take_dirty(&mut self) -> (u64, Vec<KeyWrite>) {
        let writes = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|key| {
                let value = match self.keys.get(&key) {
                    Some(entries) if !entries.is_empty() => {
                        Some(if key.starts_with(BATCH_PREFIX) {
                            serde_json::to_string(entries).expect("index entries serialize")
                        } else {
                            serde_json::to_string(&entries[&key]).expect("index entries serialize")
                        })
                    }
                    _ => None,
                };
                if value.is_none() {
                    self.keys.remove(&key);
                    if self.open.as_ref() == Some(&key) {
                        self.open = None;
                    }
                }
                KeyWrite { key, value }
            })
            .collect();
        (self.version, writes)
    }

    /// A flush wrote everything up to `version`.
    pub fn flushed(&mut self, version: u64) {
        self.durable = self.durable.max(version);
    }

    /// A flush failed: its keys are written again by the next one (with whatever they hold then).
    pub fn flush_failed(&mut self, writes: &[KeyWrite]) {
        for w in writes {
            self.dirty.insert(w.key.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(volume: &str) -> IndexValue {
        IndexValue {
            managed_by: Some("u".into()),
            volume: volume.into(),
            features: vec!["layering".into()],
            ..IndexValue::default()
        }
    }

    /// Applies writes to a listing, as `rados setomapval` / `rmomapkey` would.
    fn apply(listing: &mut BTreeMap<String, Vec<u8>>, writes: &[KeyWrite]) {
        for w in writes {
            match &w.value {
                Some(val) => listing.insert(w.key.clone(), val.clone().into_bytes()),
                None => listing.remove(&w.key),
            };
        }
    }

    #[test]
    fn a_burst_of_creates_is_one_write() {
        let mut ix = PoolIndex::from_listing(BTreeMap::new(), "t");
        let mut last = 0;
        for i in 0..10 {
            last = ix.set(&format!("img{i}"), v(&format!("v{i}")));
        }
        assert!(!ix.durable(last));
        let (version, writes) = ix.take_dirty();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(writes[0].key.starts_with(BATCH_PREFIX));
        ix.flushed(version);
        assert!(ix.durable(last));
        let mut listing = BTreeMap::new();
        apply(&mut listing, &writes);
        assert_eq!(
            PoolIndex::from_listing(listing, "u").entries(),
            ix.entries()
        );
    }

    #[test]
    fn batches_fill_up_then_a_new_one_opens() {
        let mut ix = PoolIndex::from_listing(BTreeMap::new(), "t");
        for i in 0..BATCH_MAX + 1 {
            ix.set(&format!("img{i}"), v("x"));
        }
        let (_, writes) = ix.take_dirty();
        assert_eq!(writes.len(), 2);
        assert!(writes.iter().all(|w| w.value.is_some()));
    }

    #[test]
    fn old_style_keys_are_read_and_updated_in_place() {
        let listing = BTreeMap::from([
            ("old".to_string(), b"vol-old".to_vec()),
            (
                "older".to_string(),
                serde_json::to_vec(&v("vol-older")).unwrap(),
            ),
        ]);
        let mut ix = PoolIndex::from_listing(listing.clone(), "t");
        assert_eq!(ix.get("old").unwrap().volume, "vol-old");
        assert_eq!(ix.get("older").unwrap().volume, "vol-older");
        ix.set("older", v("renamed"));
        let (_, writes) = ix.take_dirty();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].key, "older");
        let mut l = listing;
        apply(&mut l, &writes);
        assert_eq!(
            PoolIndex::from_listing(l, "u").get("older").unwrap().volume,
            "renamed"
        );
    }

    #[test]
    fn removing_the_last_entry_of_a_key_removes_the_key() {
        let mut ix = PoolIndex::from_listing(BTreeMap::new(), "t");
        ix.set("a", v("a"));
        ix.set("b", v("b"));
        let (_, w) = ix.take_dirty();
        let mut listing = BTreeMap::new();
        apply(&mut listing, &w);
        ix.remove("a");
        let (_, w) = ix.take_dirty();
        assert!(w[0].value.is_some(), "b is still in the batch");
        apply(&mut listing, &w);
        ix.remove("b");
        let (_, w) = ix.take_dirty();
        assert_eq!(w[0].value, None);
        apply(&mut listing, &w);
        assert!(listing.is_empty());
        // A new entry opens a new batch.
        ix.set("c", v("c"));
        let (_, w) = ix.take_dirty();
        assert!(w[0].value.is_some());
    }

    #[test]
    fn an_unchanged_entry_writes_nothing_and_a_failed_flush_is_retried() {
        let mut ix = PoolIndex::from_listing(BTreeMap::new(), "t");
        let a = ix.set("a", v("a"));
        let (version, w) = ix.take_dirty();
        ix.flush_failed(&w);
        assert!(!ix.durable(a));
        assert!(ix.has_dirty());
        let (version2, w2) = ix.take_dirty();
        assert!(version2 >= version);
        assert_eq!(w, w2);
        ix.flushed(version2);
        let again = ix.set("a", v("a"));
        assert!(ix.durable(again), "no change, nothing to wait for");
        assert!(!ix.has_dirty());
    }

    #[test]
    fn a_new_batch_never_reuses_a_listed_key() {
        let mut ix = PoolIndex::from_listing(BTreeMap::new(), "t");
        ix.set("a", v("a"));
        let (_, w) = ix.take_dirty();
        let mut listing = BTreeMap::new();
        apply(&mut listing, &w);
        // The same process reads the index again (same prefix), then adds an image.
        let mut again = PoolIndex::from_listing(listing.clone(), "t");
        again.set("b", v("b"));
        let (_, w2) = again.take_dirty();
        assert_ne!(w2[0].key, w[0].key);
        apply(&mut listing, &w2);
        let read = PoolIndex::from_listing(listing, "t");
        assert_eq!(read.len(), 2);
    }

    #[test]
    fn an_image_in_its_own_key_and_a_batch_is_read_from_its_own_key() {
        let batch = serde_json::to_vec(&BTreeMap::from([("a", v("from-batch"))])).unwrap();
        let listing = BTreeMap::from([
            ("a".to_string(), serde_json::to_vec(&v("own")).unwrap()),
            (format!("{BATCH_PREFIX}x.1"), batch),
        ]);
        let ix = PoolIndex::from_listing(listing, "t");
        assert_eq!(ix.get("a").unwrap().volume, "own");
        assert_eq!(ix.len(), 1);
    }
}
