//! One item's bytes in one heap allocation: a fixed header (timestamps, access
//! count, the item's expiry-wheel links, lengths), then the key, the value
//! and the item's interned tag ids.
//!
//! Why one allocation with the metadata inside. Per item, the store pays for
//! its slab entry, its hash-index bucket and its allocation rounded up to the
//! allocator's size class. Keeping the metadata in the slab entry (64 bytes
//! before) and the key and value in a separate, rounded allocation paid both
//! the metadata and the rounding; here the slab entry is a thin pointer plus
//! the LRU links (16 bytes), and the header fills what the size class would
//! otherwise waste (16-byte key + 100-byte value + 43-byte header = 159 bytes
//! in mimalloc's 160-byte class). The header is packed, 43 bytes, not a
//! padded 48: the key starts right after its last field. The byte budget per item is
//! written down in the README's memory section.
//!
//! The expiry links live here rather than in the slab because only writes,
//! deletes and the sweeper touch them, while the LRU links in the slab are
//! touched by every read.
//!
//! This is the store's only `unsafe` code: it owns the allocation, sizes it
//! from the header's lengths, and hands out slices within it.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::fmt;
use std::ptr::NonNull;

use super::clock::UnixNanos;
use super::expiry::Link;
use super::tags::TagId;

/// Longest key an item can hold (its length is a `u16` in the header).
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;
/// Most tags an item can carry (the count is a `u8` in the header).
pub const MAX_TAGS: usize = u8::MAX as usize;

/// The fixed part of an item. Packed (alignment 1, no padding, 43 bytes): the
/// Rust binding of mimalloc serves any alignment above 1 through its aligned
/// path, which for a 160-byte item handed out a 192-byte block, so the item
/// is allocated with alignment 1 and its fields are read by value.
#[repr(C, packed)]
pub(super) struct Header {
    pub(super) created_at: UnixNanos,
    pub(super) accessed_at: UnixNanos,
    pub(super) expires_at: UnixNanos,
    /// The item's links in its shard's expiry wheel (see [`super::expiry`]).
    pub(super) expiry: Link,
    /// Saturates at `u32::MAX` rather than spending 4 more bytes on every item.
    pub(super) access_count: u32,
    value_len: u32,
    key_len: u16,
    tag_count: u8,
}

/// Bytes of the header: the key starts here.
pub const HEADER_BYTES: usize = size_of::<Header>();

/// What a new item holds besides its links.
pub(super) struct ItemParts<'a> {
    pub(super) key: &'a [u8],
    pub(super) value: &'a [u8],
    pub(super) tags: &'a [TagId],
    pub(super) created_at: UnixNanos,
    pub(super) accessed_at: UnixNanos,
    pub(super) expires_at: UnixNanos,
    pub(super) access_count: u32,
}

/// The owner of one item's allocation.
pub(super) struct ItemBox(NonNull<Header>);

// SAFETY: an `ItemBox` owns its allocation exclusively, like a `Box`, and has
// no interior mutability.
unsafe impl Send for ItemBox {}
unsafe impl Sync for ItemBox {}

fn layout(key: usize, value: usize, tags: usize) -> Layout {
    let size = HEADER_BYTES + key + value + tags * size_of::<TagId>();
    Layout::from_size_align(size, align_of::<Header>()).expect("item sizes are bounded")
}

impl ItemBox {
    /// Allocates and fills an item. The caller has checked the bounds
    /// ([`MAX_KEY_BYTES`], [`MAX_TAGS`], a value below 4 GiB).
    pub(super) fn new(parts: ItemParts<'_>) -> Self {
        assert!(parts.key.len() <= MAX_KEY_BYTES && parts.tags.len() <= MAX_TAGS);
        let value_len = u32::try_from(parts.value.len()).expect("values are below 4 GiB");
        let layout = layout(parts.key.len(), parts.value.len(), parts.tags.len());
        // SAFETY: the layout's size is at least `size_of::<Header>() > 0`.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<Header>()) else {
            handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is a fresh allocation of `layout`, aligned for
        // `Header` (alignment 1) and at least that big; the key, value and tag ids are
        // written within `layout.size()` (which counts them all), and the
        // sources do not overlap the new allocation.
        unsafe {
            ptr.as_ptr().write(Header {
                created_at: parts.created_at,
                accessed_at: parts.accessed_at,
                expires_at: parts.expires_at,
                expiry: Link::UNLINKED,
                access_count: parts.access_count,
                value_len,
                key_len: parts.key.len() as u16,
                tag_count: parts.tags.len() as u8,
            });
            let mut at = raw.add(HEADER_BYTES);
            std::ptr::copy_nonoverlapping(parts.key.as_ptr(), at, parts.key.len());
            at = at.add(parts.key.len());
            std::ptr::copy_nonoverlapping(parts.value.as_ptr(), at, parts.value.len());
            at = at.add(parts.value.len());
            for &id in parts.tags {
                at.cast::<TagId>().write_unaligned(id);
                at = at.add(size_of::<TagId>());
            }
        }
        Self(ptr)
    }

    /// Rewrites the item in place when `parts` has the layout it was
    /// allocated with (the same key, and a value and tag list of the same
    /// lengths): its times, access count, value and tag ids, keeping its
    /// expiry links. Returns false, changing nothing, otherwise. A rewrite of
    /// a key with a value of the same size, the common one, so costs no
    /// allocation and no free.
    pub(super) fn overwrite(&mut self, parts: &ItemParts<'_>) -> bool {
        // The caller found this item by `parts.key`: only the lengths decide.
        debug_assert_eq!(parts.key, self.key(), "an item rewritten under another key");
        if parts.key.len() != self.key_len()
            || parts.value.len() != self.value_len()
            || parts.tags.len() != usize::from(self.header().tag_count)
        {
            return false;
        }
        let h = self.header_mut();
        h.created_at = parts.created_at;
        h.accessed_at = parts.accessed_at;
        h.expires_at = parts.expires_at;
        h.access_count = parts.access_count;
        let value_at = HEADER_BYTES + self.key_len();
        let tags_at = value_at + parts.value.len();
        // SAFETY: the value and the tag ids lie within the allocation at
        // these offsets (see `new`; their lengths were just checked to be
        // the ones it was allocated with), and `&mut self` makes the writes
        // exclusive; `parts` cannot borrow from this item while `self` is
        // borrowed mutably, so the copies do not overlap.
        unsafe {
            let base = self.0.as_ptr().cast::<u8>();
            std::ptr::copy_nonoverlapping(
                parts.value.as_ptr(),
                base.add(value_at),
                parts.value.len(),
            );
            let mut at = base.add(tags_at);
            for &id in parts.tags {
                at.cast::<TagId>().write_unaligned(id);
                at = at.add(size_of::<TagId>());
            }
        }
        true
    }

    pub(super) fn header(&self) -> &Header {
        // SAFETY: the allocation holds an initialised `Header` for as long as
        // `self` lives (see `new`).
        unsafe { self.0.as_ref() }
    }

    pub(super) fn header_mut(&mut self) -> &mut Header {
        // SAFETY: as in `header`, and `&mut self` makes the access exclusive.
        unsafe { self.0.as_mut() }
    }

    fn bytes(&self, from: usize, len: usize) -> &[u8] {
        // SAFETY: callers ask only for ranges inside the key, value or tag
        // ids, which `new` wrote within the allocation.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>().add(from), len) }
    }

    pub(super) fn key_len(&self) -> usize {
        usize::from(self.header().key_len)
    }

    pub(super) fn value_len(&self) -> usize {
        self.header().value_len as usize
    }

    pub(super) fn key(&self) -> &[u8] {
        self.bytes(HEADER_BYTES, self.key_len())
    }

    pub(super) fn value(&self) -> &[u8] {
        self.bytes(HEADER_BYTES + self.key_len(), self.value_len())
    }

    /// The item's tag ids, in the order the client gave them.
    pub(super) fn tag_ids(&self) -> impl ExactSizeIterator<Item = TagId> + '_ {
        let raw = self.bytes(
            HEADER_BYTES + self.key_len() + self.value_len(),
            usize::from(self.header().tag_count) * size_of::<TagId>(),
        );
        raw.chunks_exact(size_of::<TagId>())
            .map(|c| TagId::from_ne_bytes(c.try_into().expect("chunks of 4")))
    }
}

impl Drop for ItemBox {
    fn drop(&mut self) {
        let h = self.header();
        let layout = layout(
            usize::from(h.key_len),
            h.value_len as usize,
            usize::from(h.tag_count),
        );
        // SAFETY: allocated in `new` with this same layout (the lengths it
        // is computed from never change).
        unsafe { dealloc(self.0.as_ptr().cast(), layout) }
    }
}

impl fmt::Debug for ItemBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ItemBox")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value_len())
            .field("tags", &self.tag_ids().collect::<Vec<_>>())
            .field("expires_at", &{ self.header().expires_at })
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &[u8], value: &[u8], tags: &[TagId]) -> ItemBox {
        ItemBox::new(ItemParts {
            key,
            value,
            tags,
            created_at: 1,
            accessed_at: 2,
            expires_at: 3,
            access_count: 4,
        })
    }

    #[test]
    fn header_is_43_bytes_and_the_parts_read_back() {
        assert_eq!(HEADER_BYTES, 43);
        for (key, value, tags) in [
            (&b"k"[..], &b""[..], &[][..]),
            (b"key:000000000042", &[b'v'; 100][..], &[7, 0, u32::MAX][..]),
            (&[b'x'; 300][..], &[0u8; 5000][..], &[1][..]),
        ] {
            let mut it = item(key, value, tags);
            assert_eq!(it.key(), key);
            assert_eq!(it.value(), value);
            assert_eq!(it.tag_ids().collect::<Vec<_>>(), tags);
            it.header_mut().access_count += 1;
            let h = it.header();
            assert_eq!(
                (h.created_at, h.accessed_at, h.expires_at, h.access_count),
                (1, 2, 3, 5)
            );
            assert_eq!({ h.expiry }, Link::UNLINKED);
        }
    }

    #[test]
    fn a_100_byte_value_and_16_byte_key_fill_a_160_byte_size_class() {
        assert_eq!(layout(16, 100, 0).size(), 159);
        assert_eq!(layout(16, 100, 0).align(), 1);
    }
}
