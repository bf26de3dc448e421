//! A shard's slab: its slot entries, in chunks of [`CHUNK`] slots that are
//! allocated as the shard grows and freed as soon as they empty, so the
//! memory of the slab follows the items held instead of staying at its
//! high-water mark (after a burst, or after most items were deleted).
//!
//! Each chunk keeps its own free list and count; the chunks with a free slot
//! form a doubly linked list, so taking and giving back a slot are O(1), and
//! freeing an empty chunk is O(1) too. An emptied chunk is kept while it is
//! the only one with room, so one key written and deleted over and over at a
//! chunk boundary does not allocate and free a chunk each time.
//!
//! Slot ids are stable for an item's life (the index, the LRU and expiry
//! links and the tag sets hold them), so chunks never move their slots; a
//! freed chunk leaves a hole in the id space that the next new chunk reuses.

use std::ops::{Index, IndexMut};

use super::SlotId;
use super::shard::Slot;

const CHUNK_BITS: u32 = 10;
/// Slots per chunk: 1024 x 16 bytes, a 16 KiB allocation.
pub(super) const CHUNK: usize = 1 << CHUNK_BITS;
const NIL: SlotId = SlotId::MAX;
const NO_CHUNK: u32 = u32::MAX;

#[derive(Debug)]
struct Chunk {
    slots: Box<[Slot]>,
    /// This chunk's free slots, linked through their `next`.
    free_head: SlotId,
    free: u32,
    /// The neighbours in the list of chunks that have a free slot.
    prev_open: u32,
    next_open: u32,
}

#[derive(Debug)]
pub(super) struct Slab {
    chunks: Vec<Option<Chunk>>,
    /// First chunk with a free slot.
    open_head: u32,
    /// Indices of freed chunks, reused before the vector grows.
    holes: Vec<u32>,
    /// Slot ids must stay below this.
    max_slots: SlotId,
}

impl Slab {
    pub(super) fn new(max_slots: SlotId) -> Self {
        Self {
            chunks: Vec::new(),
            open_head: NO_CHUNK,
            holes: Vec::new(),
            max_slots,
        }
    }

    /// One past the highest slot id that can be in use (holes included).
    pub(super) fn len(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// The slot, or `None` inside a freed chunk.
    pub(super) fn get(&self, slot: usize) -> Option<&Slot> {
        self.chunks
            .get(slot >> CHUNK_BITS)?
            .as_ref()
            .map(|c| &c.slots[slot & (CHUNK - 1)])
    }

    /// Chunks allocated (tests).
    #[cfg(test)]
    pub(super) fn chunks(&self) -> usize {
        self.chunks.iter().flatten().count()
    }

    /// Slots in allocated chunks, free or not. O(chunks). (tests)
    #[cfg(test)]
    pub(super) fn allocated_slots(&self) -> usize {
        self.chunks.iter().flatten().count() * CHUNK
    }

    /// Takes a free slot (its item is `None`). O(1), plus a chunk's
    /// initialisation when every chunk is full.
    pub(super) fn alloc(&mut self) -> SlotId {
        if self.open_head == NO_CHUNK {
            self.add_chunk();
        }
        let c = self.open_head;
        let chunk = self.chunks[c as usize]
            .as_mut()
            .expect("open chunks are live");
        let slot = chunk.free_head;
        chunk.free_head = chunk.slots[slot as usize & (CHUNK - 1)].next;
        chunk.free -= 1;
        if chunk.free == 0 {
            self.unlink_open(c);
        }
        slot
    }

    /// Gives back a slot whose item the caller has dropped. O(1); frees the
    /// chunk when it empties, unless no other chunk has room.
    pub(super) fn free(&mut self, slot: SlotId) {
        let c = slot >> CHUNK_BITS;
        let chunk = self.chunks[c as usize]
            .as_mut()
            .expect("a live slot's chunk");
        let s = &mut chunk.slots[slot as usize & (CHUNK - 1)];
        debug_assert!(s.item.is_none(), "slot {slot} freed while holding an item");
        s.next = chunk.free_head;
        chunk.free_head = slot;
        chunk.free += 1;
        let free = chunk.free;
        if free == 1 {
            self.link_open(c);
        }
        if free as usize == CHUNK && !(self.open_head == c && self.chunk(c).next_open == NO_CHUNK) {
            self.unlink_open(c);
            self.chunks[c as usize] = None;
            self.holes.push(c);
            while self.chunks.last().is_some_and(Option::is_none) {
                self.chunks.pop();
                let last = self.chunks.len() as u32;
                self.holes.retain(|&h| h != last);
            }
        }
    }

    fn chunk(&self, c: u32) -> &Chunk {
        self.chunks[c as usize].as_ref().expect("a live chunk")
    }

    fn chunk_mut(&mut self, c: u32) -> &mut Chunk {
        self.chunks[c as usize].as_mut().expect("a live chunk")
    }

    fn add_chunk(&mut self) {
        let c = self.holes.pop().unwrap_or(self.chunks.len() as u32);
        let base = c << CHUNK_BITS;
        assert!(
            (base as u64 + CHUNK as u64) <= u64::from(self.max_slots),
            "shard slab is full"
        );
        let slots = (0..CHUNK as SlotId)
            .map(|i| {
                Slot::free(if i + 1 < CHUNK as SlotId {
                    base + i + 1
                } else {
                    NIL
                })
            })
            .collect();
        let chunk = Chunk {
            slots,
            free_head: base,
            free: CHUNK as u32,
            prev_open: NO_CHUNK,
            next_open: NO_CHUNK,
        };
        if c as usize == self.chunks.len() {
            self.chunks.push(Some(chunk));
        } else {
            self.chunks[c as usize] = Some(chunk);
        }
        self.link_open(c);
    }

    fn link_open(&mut self, c: u32) {
        let head = self.open_head;
        {
            let chunk = self.chunk_mut(c);
            chunk.prev_open = NO_CHUNK;
            chunk.next_open = head;
        }
        if head != NO_CHUNK {
            self.chunk_mut(head).prev_open = c;
        }
        self.open_head = c;
    }

    fn unlink_open(&mut self, c: u32) {
        let (prev, next) = {
            let chunk = self.chunk(c);
            (chunk.prev_open, chunk.next_open)
        };
        if prev != NO_CHUNK {
            self.chunk_mut(prev).next_open = next;
        } else {
            self.open_head = next;
        }
        if next != NO_CHUNK {
            self.chunk_mut(next).prev_open = prev;
        }
    }
}

impl Index<usize> for Slab {
    type Output = Slot;

    fn index(&self, slot: usize) -> &Slot {
        self.get(slot).expect("a slot of a live chunk")
    }
}

impl IndexMut<usize> for Slab {
    fn index_mut(&mut self, slot: usize) -> &mut Slot {
        &mut self.chunks[slot >> CHUNK_BITS]
            .as_mut()
            .expect("a slot of a live chunk")
            .slots[slot & (CHUNK - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_freed_as_they_empty_but_the_last_one_with_room_stays() {
        let mut slab = Slab::new(SlotId::MAX - 1024);
        let slots: Vec<SlotId> = (0..3 * CHUNK + 5).map(|_| slab.alloc()).collect();
        assert_eq!(slab.chunks(), 4);
        let mut sorted = slots.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), slots.len(), "every slot handed out once");
        // Free the first three chunks' slots: they go, the fourth stays.
        for &s in &slots[..3 * CHUNK] {
            slab.free(s);
        }
        assert_eq!(slab.chunks(), 1);
        for &s in &slots[3 * CHUNK..] {
            slab.free(s);
        }
        assert_eq!(slab.chunks(), 1, "the only chunk with room is kept");
        // A write and delete at the boundary reuses it, allocating nothing.
        for _ in 0..10 {
            let s = slab.alloc();
            assert_eq!(slab.chunks(), 1);
            slab.free(s);
        }
        // Holes are reused: new chunks fill the freed ids first.
        let again: Vec<SlotId> = (0..2 * CHUNK).map(|_| slab.alloc()).collect();
        assert!(
            again
                .iter()
                .all(|&s| (s as usize) < 2 * CHUNK || slab.get(s as usize).is_some())
        );
        assert!(slab.len() <= 4 * CHUNK);
    }
}
