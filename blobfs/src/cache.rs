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
}

#[derive(Default)]
struct Shard {
    map: HashMap<Key, Entry>,
    clock: VecDeque<Key>,
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
        if s.map
            .insert(
                key,
                Entry {
                    data,
                    referenced: false,
                },
            )
            .is_none()
        {
            self.chunks.fetch_add(1, Ordering::Relaxed);
            s.clock.push_back(key);
        }
        while s.map.len() > self.per_shard_chunks {
            let Some(k) = s.clock.pop_front() else { break };
            match s.map.get_mut(&k) {
                Some(e) if e.referenced => {
                    e.referenced = false;
                    s.clock.push_back(k);
                }
                Some(_) => {
                    s.map.remove(&k);
                    self.chunks.fetch_sub(1, Ordering::Relaxed);
                }
                None => {}
            }
        }
        // Keys of invalidated chunks linger in the clock; trim them.
        if s.clock.len() > 2 * self.per_shard_chunks + 16 {
            let Shard { map, clock } = &mut *s;
            clock.retain(|k| map.contains_key(k));
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
}
