//! The agent's view of the images it manages: what it knows of each (size, features, ownership,
//! policy, trash state), kept in memory so that a report costs no command per image.
//!
//! Filled at start-up from per-pool listings, updated by the agent's own mutations as they
//! complete (a report right after a create shows it), and corrected by the background sweep
//! (`Ceph::sweep_loop`), which re-reads images at a bounded rate to find out-of-band changes.
//!
//! Every change that a report would show raises the view's generation; each image remembers the
//! generation of its last change, and removed images leave a tombstone, so that a controller can
//! ask for what changed since the generation it has ([`View::changes`]).
//!
//! A sweep's read never overwrites a mutation: each image has an epoch that every mutation raises
//! when it starts and when it ends; a read taken while a mutation ran is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use protocol::{ImageState, ImageStatus};

use crate::ceph::ImageSpec;

/// Tombstones kept for removed images; a controller further behind gets everything again.
const MAX_TOMBSTONES: usize = 4096;

#[derive(Debug, Clone)]
struct Entry {
    status: ImageStatus,
    /// Generation of the last change of `status`.
    gen: u64,
    /// Last time the cluster was read for it, or one of our mutations completed on it.
    checked: Option<Instant>,
    /// Mutations in flight.
    busy: u32,
    /// Raised when a mutation starts and when it ends.
    epoch: u64,
}

/// A sweep's ticket for one image: apply the read only if nothing mutated it meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
}

/// What changed since a generation (see [`View::changes`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// The view's generation now.
    pub generation: u64,
    /// `images` is everything, not a difference.
    pub full: bool,
    /// Changed (or all) images after the cursor, at most `limit`.
    pub images: Vec<ImageStatus>,
    /// Removed images (`pool/image`), when not `full`.
    pub removed: Vec<String>,
    /// More images follow the page.
    pub more: bool,
}

/// The images the agent manages, by `pool/image`.
#[derive(Debug, Default)]
pub struct View {
    generation: u64,
    images: BTreeMap<ImageSpec, Entry>,
    /// Removed image and the generation it was removed at, oldest first.
    tombstones: VecDeque<(ImageSpec, u64)>,
    /// Changes at or below this generation may have lost their tombstone.
    floor: u64,
    /// Sweep order: images in the order they are to be visited.
    ring: VecDeque<ImageSpec>,
}

impl View {
    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// What is known of `spec`.
    pub fn get(&self, spec: &ImageSpec) -> Option<&ImageStatus> {
        self.images.get(spec).map(|e| &e.status)
    }

    /// Every image, ordered by pool and name.
    pub fn all(&self) -> Vec<ImageStatus> {
        self.images.values().map(|e| e.status.clone()).collect()
    }

    /// The images of one pool.
    pub fn in_pool<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = &'a ImageSpec> + 'a {
        self.images.keys().filter(move |s| s.pool.as_str() == pool)
    }

    /// Sets what is known of `spec` (from our own mutation or a fresh read); returns whether a
    /// report would show a difference. Watchers are never kept: they are looked up live.
    pub fn set(&mut self, spec: &ImageSpec, mut status: ImageStatus, now: Instant) -> bool {
        status.watchers = None;
        let changed = match self.images.get_mut(spec) {
            Some(e) => {
                e.checked = Some(now);
                if e.status == status {
                    false
                } else {
                    e.status = status;
                    self.generation += 1;
                    e.gen = self.generation;
                    true
                }
            }
            None => {
                self.generation += 1;
                self.tombstones.retain(|(s, _)| s != spec);
                self.images.insert(
                    spec.clone(),
                    Entry {
                        status,
                        gen: self.generation,
                        checked: Some(now),
                        busy: 0,
                        epoch: 0,
                    },
                );
                self.ring.push_back(spec.clone());
                true
            }
        };
        changed
    }

    /// Adds an image whose state is not read yet (found in an index); the sweep visits it first.
    pub fn add_unchecked(&mut self, spec: &ImageSpec, status: ImageStatus) -> bool {
        if self.images.contains_key(spec) {
            return false;
        }
        let changed = self.set(spec, status, Instant::now());
        self.mark_unchecked(spec);
        changed
    }

    /// Makes the sweep read `spec` next (the listings say it changed).
    pub fn mark_unchecked(&mut self, spec: &ImageSpec) {
        if let Some(e) = self.images.get_mut(spec) {
            e.checked = None;
            if let Some(pos) = self.ring.iter().position(|s| s == spec) {
                self.ring.remove(pos);
            }
            self.ring.push_front(spec.clone());
        }
    }

    /// Forgets `spec` (deleted, or gone from the index); returns whether it was known.
    pub fn remove(&mut self, spec: &ImageSpec) -> bool {
        if self.images.remove(spec).is_none() {
            return false;
        }
        self.generation += 1;
        self.tombstones.push_back((spec.clone(), self.generation));
        while self.tombstones.len() > MAX_TOMBSTONES {
            if let Some((_, g)) = self.tombstones.pop_front() {
                self.floor = g;
            }
        }
        true
    }

    /// A mutation of `spec` starts: sweeps reading it meanwhile are dropped.
    pub fn begin(&mut self, spec: &ImageSpec) {
        if let Some(e) = self.images.get_mut(spec) {
            e.busy += 1;
            e.epoch += 1;
        }
    }

    /// A mutation of `spec` ended (whatever its outcome).
    pub fn end(&mut self, spec: &ImageSpec) {
        if let Some(e) = self.images.get_mut(spec) {
            e.busy = e.busy.saturating_sub(1);
            e.epoch += 1;
        }
    }

    /// The next image the sweep should read, if one was last checked before `older_than`; it
    /// goes to the back of the order either way.
    pub fn next_to_sweep(&mut self, older_than: Instant) -> Option<(ImageSpec, Ticket)> {
        for _ in 0..self.ring.len() {
            let spec = self.ring.pop_front()?;
            let Some(e) = self.images.get(&spec) else {
                // Removed meanwhile: drop it from the order.
                continue;
            };
            self.ring.push_back(spec.clone());
            if e.busy > 0 {
                continue;
            }
            if e.checked.is_some_and(|c| c >= older_than) {
                continue;
            }
            return Some((spec, Ticket { epoch: e.epoch }));
        }
        None
    }

    /// Applies a sweep's read of `spec` (`None`: the image is not live and not in the trash
    /// listing given) unless a mutation ran meanwhile. Returns whether a report changed.
    pub fn apply_sweep(&mut self, spec: &ImageSpec, ticket: Ticket, status: ImageStatus) -> bool {
        match self.images.get(spec) {
            Some(e) if e.epoch == ticket.epoch && e.busy == 0 => {
                self.set(spec, status, Instant::now())
            }
            _ => false,
        }
    }

    /// Images changed since `since`, after `after` (`pool/image`), at most `limit`.
    pub fn changes(&self, since: u64, after: Option<&str>, limit: usize) -> Changes {
        let full = since == 0 || since < self.floor || since > self.generation;
        let limit = limit.max(1);
        let mut images = vec![];
        let mut more = false;
        let start = after.and_then(|a| {
            let (pool, image) = a.split_once('/')?;
            ImageSpec::parse(pool, image).ok()
        });
        let range: Box<dyn Iterator<Item = (&ImageSpec, &Entry)>> = match &start {
            Some(s) => Box::new(self.images.range((
                std::ops::Bound::Excluded(s.clone()),
                std::ops::Bound::Unbounded,
            ))),
            None => Box::new(self.images.iter()),
        };
        for (_, e) in range {
            if !full && e.gen <= since {
                continue;
            }
            if images.len() == limit {
                more = true;
                break;
            }
            images.push(e.status.clone());
        }
        let removed = if full {
            vec![]
        } else {
            self.tombstones
                .iter()
                .filter(|(_, g)| *g > since)
                .map(|(s, _)| s.to_string())
                .collect()
        };
        Changes {
            generation: self.generation,
            full,
            images,
            removed,
            more,
        }
    }

    /// Raises the generation for a change outside the images (the cluster's health, pools...).
    pub fn bump(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }
}

/// An image's status when only its index entry is known (the sweep reads the rest).
pub fn unread(spec: &ImageSpec, metadata: BTreeMap<String, String>) -> ImageStatus {
    ImageStatus {
        pool: spec.pool.to_string(),
        image: spec.image.to_string(),
        state: ImageState::Missing,
        size_bytes: 0,
        features: vec![],
        watchers: None,
        metadata: metadata.into(),
        unverified: false,
        parent: None,
        clone_depth: None,
        snapshots: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(i: &str) -> ImageSpec {
        ImageSpec::parse("rbd", i).unwrap()
    }

    fn live(i: &str, size: u64) -> ImageStatus {
        ImageStatus {
            pool: "rbd".into(),
            image: i.into(),
            state: ImageState::Live,
            size_bytes: size,
            features: vec![],
            watchers: None,
            metadata: Default::default(),
            unverified: false,
            parent: None,
            clone_depth: None,
            snapshots: vec![],
        }
    }

    #[test]
    fn changes_since_a_generation_are_the_changed_and_the_removed() {
        let mut v = View::default();
        let now = Instant::now();
        assert!(v.set(&spec("a"), live("a", 1), now));
        assert!(v.set(&spec("b"), live("b", 1), now));
        let g = v.generation();
        assert!(
            !v.set(&spec("a"), live("a", 1), now),
            "same state is no change"
        );
        assert!(v.set(&spec("b"), live("b", 2), now));
        assert!(v.remove(&spec("a")));
        let c = v.changes(g, None, 100);
        assert!(!c.full);
        assert_eq!(c.images, vec![live("b", 2)]);
        assert_eq!(c.removed, vec!["rbd/a".to_string()]);
        let all = v.changes(0, None, 100);
        assert!(all.full);
        assert_eq!(all.images, vec![live("b", 2)]);
        assert!(v.changes(v.generation(), None, 100).images.is_empty());
        // A generation from the future (the agent restarted) is answered in full.
        assert!(v.changes(v.generation() + 5, None, 100).full);
    }

    #[test]
    fn pages_continue_after_the_cursor() {
        let mut v = View::default();
        for i in 0..25 {
            let name = format!("i{i:02}");
            v.set(&spec(&name), live(&name, 1), Instant::now());
        }
        let mut seen = vec![];
        let mut after: Option<String> = None;
        loop {
            let c = v.changes(0, after.as_deref(), 10);
            seen.extend(c.images.iter().map(|i| i.image.clone()));
            if !c.more {
                break;
            }
            after = Some(format!("rbd/{}", seen.last().unwrap()));
        }
        assert_eq!(seen.len(), 25);
    }

    #[test]
    fn a_sweep_read_taken_while_a_mutation_ran_is_dropped() {
        let mut v = View::default();
        let s = spec("a");
        v.add_unchecked(&s, live("a", 1));
        let (got, ticket) = v.next_to_sweep(Instant::now()).unwrap();
        assert_eq!(got, s);
        v.begin(&s);
        v.set(&s, live("a", 2), Instant::now());
        v.end(&s);
        assert!(
            !v.apply_sweep(&s, ticket, live("a", 1)),
            "stale read applied"
        );
        assert_eq!(v.get(&s).unwrap().size_bytes, 2);
        // A fresh ticket applies.
        let t = Ticket {
            epoch: v.images[&s].epoch,
        };
        assert!(v.apply_sweep(&s, t, live("a", 3)));
    }

    #[test]
    fn the_sweep_visits_the_least_recently_checked_and_skips_fresh_ones() {
        let mut v = View::default();
        let t0 = Instant::now();
        v.set(&spec("a"), live("a", 1), t0);
        v.set(&spec("b"), live("b", 1), t0);
        // Both checked at t0: nothing is older than t0.
        assert!(v.next_to_sweep(t0).is_none());
        let later = t0 + std::time::Duration::from_secs(1);
        let (first, _) = v.next_to_sweep(later).unwrap();
        let (second, _) = v.next_to_sweep(later).unwrap();
        assert_ne!(first, second);
        // An unchecked image jumps the queue.
        v.add_unchecked(&spec("c"), live("c", 0));
        assert_eq!(v.next_to_sweep(t0).unwrap().0, spec("c"));
    }
}
