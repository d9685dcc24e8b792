//! The read cache: fixed-size chunks of file data, shared by every handle.
//!
//! Invariants:
//! - A cached chunk equals the blob's bytes at the time the file's
//!   generation had the value recorded when the read started; a writer bumps
//!   the generation after its write completes and then drops overlapping
//!   chunks, and a reader inserts only if the generation is unchanged (both
//!   under the shard lock), so a stale chunk never survives a write.
//! - Memory is bounded: each shard holds at most its share of the limit and
//!   evicts with the CLOCK policy.
//! - A hit takes one shard mutex for a hash lookup and an `Arc` clone; it
//!   never waits for I/O or for a writer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

type Key = (u64, u64);

struct Entry {
    data: Arc<[u8]>,
    referenced: bool,
    /// Which clock slot is this entry's: slots of invalidated (and maybe
    /// re-inserted) chunks stay in the clock with an older stamp.
    stamp: u64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Key, Entry>,
    /// Keys in insertion order, each with the stamp of the entry that put it
    /// there; a slot whose stamp no longer matches its entry is stale.
    clock: VecDeque<(Key, u64)>,
    next_stamp: u64,
}

/// Cache statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found their chunk.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Bytes held now.
    pub bytes: u64,
}

pub(crate) struct Cache {
    shards: Vec<Mutex<Shard>>,
    chunk_bytes: usize,
    per_shard_chunks: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    chunks: AtomicU64,
}

const SHARDS: usize = 64;

impl Cache {
    pub fn new(limit_bytes: u64, chunk_bytes: usize) -> Cache {
        let total = (limit_bytes / chunk_bytes as u64) as usize;
        Cache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            chunk_bytes,
            per_shard_chunks: total / SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_shard_chunks > 0
    }

    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    fn shard(&self, k: Key) -> &Mutex<Shard> {
        let h = k.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.1.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        &self.shards[(h >> 32) as usize % SHARDS]
    }

    pub fn get(&self, file: u64, idx: u64) -> Option<Arc<[u8]>> {
        let mut s = self.shard((file, idx)).lock();
        match s.map.get_mut(&(file, idx)) {
            Some(e) => {
                e.referenced = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.data.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Inserts a chunk read while the file's generation was `seen`.
    pub fn insert(&self, file: u64, idx: u64, data: Arc<[u8]>, gen: &AtomicU64, seen: u64) {
        if !self.enabled() {
            return;
        }
        let key = (file, idx);
        let mut s = self.shard(key).lock();
        if gen.load(Ordering::Acquire) != seen {
            return;
        }
        if let Some(e) = s.map.get_mut(&key) {
            // Same chunk read again: new bytes, same clock slot.
            e.data = data;
        } else {
            let stamp = s.next_stamp;
            s.next_stamp += 1;
            s.map.insert(
                key,
                Entry {
                    data,
                    referenced: false,
                    stamp,
                },
            );
            self.chunks.fetch_add(1, Ordering::Relaxed);
            s.clock.push_back((key, stamp));
        }
        while s.map.len() > self.per_shard_chunks {
            let Some(slot) = s.clock.pop_front() else {
                break;
            };
            match s.map.get_mut(&slot.0) {
                Some(e) if e.stamp == slot.1 && e.referenced => {
                    e.referenced = false;
                    s.clock.push_back(slot);
                }
                Some(e) if e.stamp == slot.1 => {
                    s.map.remove(&slot.0);
                    self.chunks.fetch_sub(1, Ordering::Relaxed);
                }
                _ => {} // a stale slot
            }
        }
        // Slots of invalidated chunks linger in the clock; drop them once
        // they outnumber the live ones, so each insert pays O(1) amortized
        // (a chunk invalidated and re-inserted over and over, like a WAL's
        // tail, must not grow the clock).
        if s.clock.len() > 2 * self.per_shard_chunks + 16 {
            let shard = &mut *s;
            let map = &shard.map;
            shard
                .clock
                .retain(|slot| map.get(&slot.0).is_some_and(|e| e.stamp == slot.1));
            debug_assert_eq!(shard.clock.len(), shard.map.len());
        }
    }

    /// Drops chunks `first..=last` of `file`. Call after bumping the file's
    /// generation.
    pub fn invalidate(&self, file: u64, first: u64, last: u64) {
        if !self.enabled() {
            return;
        }
        for idx in first..=last {
            let mut s = self.shard((file, idx)).lock();
            if s.map.remove(&(file, idx)).is_some() {
                self.chunks.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.chunks.load(Ordering::Relaxed) * self.chunk_bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_generation_checked() {
        let c = Cache::new(64 * 4096 * 4, 4096);
        let gen = AtomicU64::new(0);
        for i in 0..10_000 {
            c.insert(1, i, Arc::from(vec![i as u8; 4096]), &gen, 0);
        }
        assert!(c.stats().bytes <= 64 * 4096 * 4);
        assert!(c.get(1, 9_999).is_some());
        gen.store(1, Ordering::Release);
        c.insert(2, 0, Arc::from(vec![0u8; 4096]), &gen, 0);
        assert!(c.get(2, 0).is_none(), "stale generation must not be cached");
        c.invalidate(1, 9_999, 9_999);
        assert!(c.get(1, 9_999).is_none());
    }

    /// A WAL's tail chunk is invalidated and cached again on every append:
    /// the clock must stay bounded and the entry must survive eviction
    /// rounds as one slot, not a growing pile of duplicates.
    #[test]
    fn reinserted_chunk_keeps_one_clock_slot() {
        let c = Cache::new(64 * 4096 * 4, 4096);
        let gen = AtomicU64::new(0);
        for round in 0..100_000u64 {
            c.invalidate(7, 0, 0);
            c.insert(7, 0, Arc::from(vec![round as u8; 4096]), &gen, 0);
            c.insert(7, 0, Arc::from(vec![round as u8; 4096]), &gen, 0);
        }
        let longest = c.shards.iter().map(|s| s.lock().clock.len()).max().unwrap();
        assert!(
            longest <= 2 * c.per_shard_chunks + 16,
            "clock grew to {longest}"
        );
        assert_eq!(c.get(7, 0).unwrap()[0], (99_999u64 as u8));
        assert_eq!(c.stats().bytes, 4096);
        // Fill past the limit: the chunk is evicted like any other, and the
        // byte count stays within the limit.
        for i in 0..10_000 {
            c.insert(1, i, Arc::from(vec![0u8; 4096]), &gen, 0);
        }
        assert!(c.stats().bytes <= 64 * 4096 * 4);
        for s in &c.shards {
            let s = s.lock();
            assert!(s.clock.len() >= s.map.len(), "every entry has a slot");
        }
    }
}
