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
//! - A hit takes one shard mutex for a hash lookup and copies the bytes
//!   out under it (at most a chunk): no reference count to bump on a cold
//!   line, no counter shared across shards; it never waits for I/O or for
//!   a writer. A chunk's memory is the entry's alone, so it goes back to
//!   the pool the moment the entry is evicted, dropped or replaced.
//! - Chunk memory comes from slabs the cache maps in one call each (with the
//!   pages populated) and reuses slots of dropped chunks: filling a cache of
//!   gigabytes 4 KiB at a time through malloc cost a heap-growing `mprotect`
//!   and a page fault per chunk, a sixth of a RocksDB flush thread's time.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

type Key = (u64, u64);

/// Hashes a `(file, chunk)` key with two multiply-rotate rounds: SipHash,
/// the default, showed in profiles, and keys come from us, not an attacker.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(26) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Map = HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>;

/// Bytes of one slab (at least one chunk).
const SLAB_BYTES: usize = 2 << 20;

/// The slabs chunk memory is carved from, and the free slots.
struct Pool {
    chunk_bytes: usize,
    slab_bytes: usize,
    state: Mutex<PoolState>,
}

struct PoolState {
    free: Vec<NonNull<u8>>,
    slabs: Vec<NonNull<u8>>,
}

// SAFETY: the pointers name slab memory owned by the pool; chunks hand out
// disjoint slots, and the free list is only touched under the mutex.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    fn new(chunk_bytes: usize) -> Pool {
        let per_slab = (SLAB_BYTES / chunk_bytes).max(1);
        Pool {
            chunk_bytes,
            slab_bytes: per_slab * chunk_bytes,
            state: Mutex::new(PoolState {
                free: Vec::new(),
                slabs: Vec::new(),
            }),
        }
    }

    /// A free slot, mapping a new slab when none is left; `None` when the
    /// system has no memory to give (the caller then does not cache).
    fn take(&self) -> Option<NonNull<u8>> {
        let mut st = self.state.lock();
        if let Some(p) = st.free.pop() {
            return Some(p);
        }
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.slab_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = NonNull::new(p.cast::<u8>())?;
        st.slabs.push(base);
        let n = self.slab_bytes / self.chunk_bytes;
        // SAFETY: every offset is inside the slab just mapped.
        st.free.extend(
            (1..n)
                .rev()
                .map(|i| unsafe { base.add(i * self.chunk_bytes) }),
        );
        Some(base)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for &slab in &self.state.get_mut().slabs {
            // SAFETY: mapped by `take` with this length; no chunk is left
            // (each holds the pool alive).
            unsafe { libc::munmap(slab.as_ptr().cast(), self.slab_bytes) };
        }
    }
}

/// One cached chunk's bytes: a slot of the cache's slab pool, returned to it
/// when the last holder drops it.
pub(crate) struct Chunk {
    pool: Arc<Pool>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the slot is owned by this chunk alone and only read after it is
// filled (`Cache::chunk` writes it before sharing).
unsafe impl Send for Chunk {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for Chunk {}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` (<= chunk size) initialised bytes of
        // a live slab slot owned by this chunk.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.pool.state.lock().free.push(self.ptr);
    }
}

struct Entry {
    data: Chunk,
    referenced: bool,
    /// Which clock slot is this entry's: slots of invalidated (and maybe
    /// re-inserted) chunks stay in the clock with an older stamp.
    stamp: u64,
}

#[derive(Default)]
struct Shard {
    map: Map,
    /// Keys in insertion order, each with the stamp of the entry that put it
    /// there; a slot whose stamp no longer matches its entry is stale.
    clock: VecDeque<(Key, u64)>,
    next_stamp: u64,
    /// Lookups of this shard that found their chunk, and that did not.
    hits: u64,
    misses: u64,
    /// Chunks this shard evicted to make room.
    evictions: u64,
}

/// Cache statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found their chunk.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Chunks evicted to make room for others.
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: u64,
}

pub(crate) struct Cache {
    shards: Vec<Mutex<Shard>>,
    chunk_bytes: usize,
    per_shard_chunks: usize,
    /// Chunks a read that misses fetches around the miss while the cache
    /// has room (1: only what it needs); see [`Cache::fill_extent`].
    warm_chunks: u64,
    /// Set when a chunk is evicted (see [`Cache::fill_extent`]).
    evicted: AtomicBool,
    chunks: AtomicU64,
    pool: Arc<Pool>,
}

const SHARDS: usize = 64;

impl Cache {
    /// A cache of at most `limit_bytes` in chunks of `chunk_bytes`; while it
    /// is filling, a miss reads the aligned extent of `warm_bytes` around
    /// it (see [`Cache::fill_extent`]).
    pub fn new(limit_bytes: u64, chunk_bytes: usize, warm_bytes: u64) -> Cache {
        let total = (limit_bytes / chunk_bytes as u64) as usize;
        Cache {
            // Sized up front (the table's pages are touched only as it
            // fills): growing by rehashing showed in write-through profiles.
            shards: (0..SHARDS)
                .map(|_| {
                    let cap = (total / SHARDS).min(1 << 18);
                    Mutex::new(Shard {
                        map: Map::with_capacity_and_hasher(cap, Default::default()),
                        clock: VecDeque::with_capacity(cap),
                        next_stamp: 0,
                        hits: 0,
                        misses: 0,
                        evictions: 0,
                    })
                })
                .collect(),
            chunk_bytes,
            per_shard_chunks: total / SHARDS,
            warm_chunks: (warm_bytes / chunk_bytes as u64).max(1),
            evicted: AtomicBool::new(false),
            chunks: AtomicU64::new(0),
            pool: Arc::new(Pool::new(chunk_bytes)),
        }
    }

    /// A chunk holding a copy of `bytes` (at most a chunk); `None` when no
    /// memory is left for it.
    pub fn chunk(&self, bytes: &[u8]) -> Option<Chunk> {
        debug_assert!(bytes.len() <= self.chunk_bytes);
        let ptr = self.pool.take()?;
        // SAFETY: the slot is ours, `chunk_bytes` long, and disjoint from
        // `bytes` (a caller's buffer, never pool memory handed out before).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
        Some(Chunk {
            pool: self.pool.clone(),
            ptr,
            len: bytes.len(),
        })
    }

    /// How many chunks a read that misses should fetch, as an aligned
    /// extent around the miss: the warm extent while the cache has room for
    /// it, else 1. Filling a cache that is not full costs only device
    /// bandwidth, which random 4 KiB reads leave idle, and saves the later
    /// misses in the extent (their I/O, wake-ups and interrupts); once the
    /// cache evicts, the extent would push out chunks someone read, so a
    /// miss then reads only what it needs.
    ///
    /// "Full" is "has evicted": shards fill unevenly, so some evict while
    /// the total is still short of the limit. After an eviction the extent
    /// comes back only once the cache has shrunk below half its limit (its
    /// files deleted or rewritten).
    pub fn fill_extent(&self) -> u64 {
        if self.warm_chunks <= 1 {
            return 1;
        }
        let limit = (self.per_shard_chunks * SHARDS) as u64;
        let held = self.chunks.load(Ordering::Relaxed);
        if self.evicted.load(Ordering::Relaxed) {
            if held >= limit / 2 {
                return 1;
            }
            self.evicted.store(false, Ordering::Relaxed);
        }
        if held + self.warm_chunks <= limit {
            self.warm_chunks
        } else {
            1
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

    /// Copies bytes `[from, from + dst.len())` of chunk `idx` of `file` into
    /// `dst` if the cache holds that chunk (with those bytes); false if not.
    pub fn read(&self, file: u64, idx: u64, from: usize, dst: &mut [u8]) -> bool {
        let mut s = self.shard((file, idx)).lock();
        let s = &mut *s;
        match s.map.get_mut(&(file, idx)) {
            Some(e) if from + dst.len() <= e.data.len => {
                e.referenced = true;
                s.hits += 1;
                dst.copy_from_slice(&e.data[from..from + dst.len()]);
                true
            }
            _ => {
                s.misses += 1;
                false
            }
        }
    }

    /// Whether chunk `idx` of `file` is cached (not counted as a lookup).
    pub fn contains(&self, file: u64, idx: u64) -> bool {
        self.shard((file, idx))
            .lock()
            .map
            .contains_key(&(file, idx))
    }

    /// Inserts a chunk read while the file's generation was `seen`.
    pub fn insert(&self, file: u64, idx: u64, data: Chunk, gen: &AtomicU64, seen: u64) {
        if !self.enabled() {
            return;
        }
        let key = (file, idx);
        let mut s = self.shard(key).lock();
        if gen.load(Ordering::Acquire) != seen {
            return;
        }
        self.put_locked(&mut s, key, data, false);
    }

    /// Puts what a writer just wrote in place of whatever is cached for the
    /// chunk. The writer holds the file's write lock and has bumped its
    /// generation, so no other writer can race it and readers that started
    /// before the write cannot insert over it.
    pub fn put(&self, file: u64, idx: u64, data: Chunk) {
        if !self.enabled() {
            return;
        }
        let key = (file, idx);
        let mut s = self.shard(key).lock();
        self.put_locked(&mut s, key, data, true);
    }

    /// Caches `data` under `key`. A chunk already there stays (a reader's
    /// copy is never newer than what is cached: a writer drops or replaces
    /// chunks after bumping the generation) unless `replace` (a writer's).
    fn put_locked(&self, s: &mut Shard, key: Key, data: Chunk, replace: bool) {
        let stamp = s.next_stamp;
        match s.map.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if replace {
                    // New bytes, same clock slot.
                    e.get_mut().data = data;
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Entry {
                    data,
                    referenced: false,
                    stamp,
                });
                s.next_stamp += 1;
                self.chunks.fetch_add(1, Ordering::Relaxed);
                s.clock.push_back((key, stamp));
            }
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
                    s.evictions += 1;
                    self.chunks.fetch_sub(1, Ordering::Relaxed);
                    self.evicted.store(true, Ordering::Relaxed);
                }
                _ => {} // a stale slot
            }
        }
        // Slots of invalidated chunks linger in the clock; drop them once
        // they outnumber the live ones, so each insert pays O(1) amortized
        // (a chunk invalidated and re-inserted over and over, like a WAL's
        // tail, must not grow the clock).
        if s.clock.len() > 2 * self.per_shard_chunks + 16 {
            let shard = s;
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
        let (mut hits, mut misses, mut evictions) = (0, 0, 0);
        for s in &self.shards {
            let s = s.lock();
            hits += s.hits;
            misses += s.misses;
            evictions += s.evictions;
        }
        CacheStats {
            hits,
            misses,
            evictions,
            bytes: self.chunks.load(Ordering::Relaxed) * self.chunk_bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte `at` of chunk `idx` of `file`, if cached.
    fn byte_at(c: &Cache, file: u64, idx: u64, at: usize) -> Option<u8> {
        let mut b = [0u8];
        c.read(file, idx, at, &mut b).then_some(b[0])
    }

    #[test]
    fn bounded_and_generation_checked() {
        let c = Cache::new(64 * 4096 * 4, 4096, 0);
        let gen = AtomicU64::new(0);
        for i in 0..10_000 {
            c.insert(1, i, c.chunk(&[i as u8; 4096]).unwrap(), &gen, 0);
        }
        assert!(c.stats().bytes <= 64 * 4096 * 4);
        assert_eq!(byte_at(&c, 1, 9_999, 4095), Some(9_999u64 as u8));
        gen.store(1, Ordering::Release);
        c.insert(2, 0, c.chunk(&[0u8; 4096]).unwrap(), &gen, 0);
        assert!(!c.contains(2, 0), "stale generation must not be cached");
        c.invalidate(1, 9_999, 9_999);
        assert_eq!(byte_at(&c, 1, 9_999, 0), None);
    }

    /// A hit copies exactly the bytes asked for; a read past a short chunk's
    /// end (a file's last chunk) is a miss, not a short copy; a reader's
    /// insert keeps the chunk already there, a writer's put replaces it.
    #[test]
    fn reads_copy_ranges_and_only_writers_replace() {
        let c = Cache::new(64 * 4096 * 4, 4096, 0);
        let gen = AtomicU64::new(0);
        let bytes: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        c.insert(3, 1, c.chunk(&bytes).unwrap(), &gen, 0);
        let mut dst = [0u8; 100];
        assert!(c.read(3, 1, 2_900, &mut dst));
        assert_eq!(&dst[..], &bytes[2_900..3_000]);
        assert!(
            !c.read(3, 1, 2_901, &mut dst),
            "past the chunk's 3000 bytes"
        );
        c.insert(3, 1, c.chunk(&[7u8; 4096]).unwrap(), &gen, 0);
        assert_eq!(
            byte_at(&c, 3, 1, 5),
            Some(5),
            "a reader's copy does not replace"
        );
        c.put(3, 1, c.chunk(&[7u8; 4096]).unwrap());
        assert_eq!(byte_at(&c, 3, 1, 4_000), Some(7), "a writer's does");
        let st = c.stats();
        assert_eq!((st.hits, st.misses), (3, 1));
    }

    /// A WAL's tail chunk is invalidated and cached again on every append:
    /// the clock must stay bounded and the entry must survive eviction
    /// rounds as one slot, not a growing pile of duplicates.
    #[test]
    fn reinserted_chunk_keeps_one_clock_slot() {
        let c = Cache::new(64 * 4096 * 4, 4096, 0);
        let gen = AtomicU64::new(0);
        for round in 0..100_000u64 {
            c.invalidate(7, 0, 0);
            c.insert(7, 0, c.chunk(&[round as u8; 4096]).unwrap(), &gen, 0);
            c.insert(7, 0, c.chunk(&[round as u8; 4096]).unwrap(), &gen, 0);
        }
        let longest = c.shards.iter().map(|s| s.lock().clock.len()).max().unwrap();
        assert!(
            longest <= 2 * c.per_shard_chunks + 16,
            "clock grew to {longest}"
        );
        assert_eq!(byte_at(&c, 7, 0, 0), Some(99_999u64 as u8));
        assert_eq!(c.stats().bytes, 4096);
        // Fill past the limit: the chunk is evicted like any other, and the
        // byte count stays within the limit.
        for i in 0..10_000 {
            c.insert(1, i, c.chunk(&[0u8; 4096]).unwrap(), &gen, 0);
        }
        assert!(c.stats().bytes <= 64 * 4096 * 4);
        for s in &c.shards {
            let s = s.lock();
            assert!(s.clock.len() >= s.map.len(), "every entry has a slot");
        }
    }

    /// Evicted, dropped and replaced chunks give their slots back: churning
    /// through many times the cache's size maps no more slabs than the
    /// cache holds at once, and every slot is either cached or free.
    #[test]
    fn slab_slots_are_reused() {
        let c = Cache::new(64 * 4096 * 8, 4096, 0);
        let gen = AtomicU64::new(0);
        for i in 0..100_000u64 {
            c.insert(1, i, c.chunk(&[i as u8; 4096]).unwrap(), &gen, 0);
            if i % 3 == 0 {
                c.put(1, i, c.chunk(&[i as u8; 4096]).unwrap());
            }
        }
        c.invalidate(1, 99_000, 99_499);
        let (slabs, free) = {
            let p = c.pool.state.lock();
            (p.slabs.len(), p.free.len())
        };
        let limit_slabs = (64 * 4096 * 8) / (c.pool.slab_bytes);
        assert!(
            slabs <= limit_slabs + 2,
            "{slabs} slabs for a cache of {limit_slabs}"
        );
        let cached = (c.stats().bytes / 4096) as usize;
        assert_eq!(cached + free, slabs * c.pool.slab_bytes / 4096);
        assert_eq!(byte_at(&c, 1, 99_999, 4095), Some(99_999u64 as u8));
    }
}
