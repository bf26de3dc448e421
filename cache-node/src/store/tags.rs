//! The per-shard tag index: tag name -> the slots of the items that carry it.
//!
//! Tags are interned to small integer ids so an item stores `u32`s rather than
//! strings, and so a tag's name is kept once per shard however many items carry
//! it. The index is kept exact by the shard on every insert, overwrite, delete,
//! eviction and expiry; a tag whose last item goes away is forgotten, so the
//! index never outgrows the live data.

use hashbrown::{HashMap, HashSet};

use super::SlotId;

/// An interned tag, valid within one shard.
pub type TagId = u32;

#[derive(Debug)]
struct TagEntry {
    name: Box<str>,
    members: HashSet<SlotId, foldhash::fast::FixedState>,
}

#[derive(Debug, Default)]
pub struct TagIndex {
    ids: HashMap<Box<str>, TagId, foldhash::fast::FixedState>,
    /// Indexed by `TagId`; `None` marks an id on the free list.
    entries: Vec<Option<TagEntry>>,
    free: Vec<TagId>,
}

impl TagIndex {
    /// Adds `slot` to the tag's member set, creating the tag if needed.
    /// Returns the tag's id, or `None` when `slot` was already a member (the
    /// same tag given twice for one item).
    pub fn attach(&mut self, name: &str, slot: SlotId) -> Option<TagId> {
        let id = match self.ids.get(name) {
            Some(&id) => id,
            None => self.intern(name),
        };
        self.entry_mut(id).members.insert(slot).then_some(id)
    }

    /// Removes `slot` from the tag's member set; forgets the tag once empty.
    pub fn detach(&mut self, id: TagId, slot: SlotId) {
        let entry = self.entry_mut(id);
        entry.members.remove(&slot);
        if entry.members.is_empty() {
            self.forget(id);
        } else if entry.members.capacity() > super::shard::SHRINK_FLOOR
            && entry.members.len() * 4 < entry.members.capacity()
        {
            // Memory follows the data: a set never shrinks by itself.
            let len = entry.members.len();
            entry.members.shrink_to(len * 2);
        }
    }

    /// Removes the tag and returns the slots that carried it.
    pub fn take_members(&mut self, name: &str) -> Option<(TagId, Vec<SlotId>)> {
        let id = *self.ids.get(name)?;
        let members = self.entry_mut(id).members.drain().collect();
        Some((id, members))
    }

    /// Frees a tag whose member set is already empty (after [`Self::take_members`]).
    pub fn forget(&mut self, id: TagId) {
        if let Some(entry) = self.entries[id as usize].take() {
            self.ids.remove(&entry.name);
            self.free.push(id);
        }
    }

    pub fn name(&self, id: TagId) -> &str {
        &self.entries[id as usize]
            .as_ref()
            .expect("tag id of a live item is interned")
            .name
    }

    /// Number of live items carrying `name` (0 for an unknown tag).
    pub fn count(&self, name: &str) -> usize {
        self.ids.get(name).map_or(0, |&id| {
            self.entries[id as usize]
                .as_ref()
                .map_or(0, |e| e.members.len())
        })
    }

    /// Whether `slot` is in the member set of tag `id`.
    pub fn contains(&self, id: TagId, slot: SlotId) -> bool {
        self.entries
            .get(id as usize)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.members.contains(&slot))
    }

    /// Every (tag, member) pair, for consistency checks in tests.
    pub fn memberships(&self) -> impl Iterator<Item = (&str, SlotId)> {
        self.entries
            .iter()
            .flatten()
            .flat_map(|e| e.members.iter().map(move |&s| (&*e.name, s)))
    }

    fn intern(&mut self, name: &str) -> TagId {
        let entry = TagEntry {
            name: name.into(),
            members: HashSet::default(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = Some(entry);
                id
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as TagId
            }
        };
        self.ids.insert(name.into(), id);
        id
    }

    fn entry_mut(&mut self, id: TagId) -> &mut TagEntry {
        self.entries[id as usize]
            .as_mut()
            .expect("tag id of a live item is interned")
    }
}
