#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Evicted, overwritten and shredded chunks are wiped before their memory is
//! freed: this test binary's global allocator looks, while armed, at every
//! block handed back for a canary that only the chunks' payloads carry. A
//! chunk buffer that is not zeroized before it is freed fails the test.
//! (The watcher's self-check uses a pattern of its own: the freed memory of
//! its deliberately unwiped buffer is reused by small blocks, whose unwritten
//! tails would otherwise read as a canary.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kvgate_store::{ChunkKey, Store};

mod common;
use common::*;

const CANARY: &[u8; 16] = b"\xc4NARY-kvgate-\x17\x2a\x99";
/// The watcher's own check frees an unwiped buffer of this, not of the
/// canary: what malloc later carves from that freed block (small blocks
/// whose tails it never writes) must not look like a chunk freed unwiped.
const PROBE: &[u8; 16] = b"\x5bPROBE-kvgate\x03\x81\x44";

static ARMED: AtomicBool = AtomicBool::new(false);
/// Blocks freed while armed that still held the canary.
static FREED_WITH_CANARY: AtomicUsize = AtomicUsize::new(0);
/// Blocks freed while armed that still held the probe.
static FREED_WITH_PROBE: AtomicUsize = AtomicUsize::new(0);
/// Blocks of at least a chunk's size freed while armed.
static FREED_LARGE: AtomicUsize = AtomicUsize::new(0);
const CHUNK: usize = 4096;

struct Watching;

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Relaxed) && layout.size() >= CANARY.len() {
            // Safety: the block is still ours until System.dealloc below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if block.windows(CANARY.len()).any(|w| w == CANARY) {
                FREED_WITH_CANARY.fetch_add(1, Ordering::Relaxed);
            }
            if block.windows(PROBE.len()).any(|w| w == PROBE) {
                FREED_WITH_PROBE.fetch_add(1, Ordering::Relaxed);
            }
            if layout.size() >= CHUNK {
                FREED_LARGE.fetch_add(1, Ordering::Relaxed);
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static WATCHING: Watching = Watching;

fn key(hash: i64) -> ChunkKey {
    ChunkKey::parse(&format!("/models/tiny@1@0@{hash:x}@bfloat16")).unwrap()
}

fn canary_chunk() -> Vec<u8> {
    CANARY.iter().copied().cycle().take(CHUNK).collect()
}

/// Runs `f` armed: (blocks freed with the canary, large blocks freed).
async fn armed<F: std::future::Future<Output = ()>>(f: F) -> (usize, usize) {
    FREED_WITH_CANARY.store(0, Ordering::SeqCst);
    FREED_LARGE.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f.await;
    ARMED.store(false, Ordering::SeqCst);
    (
        FREED_WITH_CANARY.load(Ordering::SeqCst),
        FREED_LARGE.load(Ordering::SeqCst),
    )
}

#[tokio::test]
async fn evicted_overwritten_and_shredded_chunks_are_wiped_before_they_are_freed() {
    // The watcher itself: a buffer dropped unwiped is seen.
    FREED_WITH_PROBE.store(0, Ordering::SeqCst);
    let probe: Vec<u8> = PROBE.iter().copied().cycle().take(CHUNK).collect();
    armed(async { drop(std::hint::black_box(probe)) }).await;
    assert_eq!(
        FREED_WITH_PROBE.load(Ordering::SeqCst),
        1,
        "the allocator sees an unwiped buffer"
    );

    // A memory tier of four chunks, shared namespace (no contracts).
    let store = Store::new(
        4 * CHUNK as u64,
        1 << 16,
        kvgate_store::Scopes::open(),
        kvgate_auth::audit::AuditLog::disabled(),
    );
    let addr = serve_store(store.clone()).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let canary = canary_chunk();
    for h in 0..4 {
        put(&mut s, key(h), &canary).await;
    }
    sync(&mut s).await;
    assert_eq!(store.memory.len(), 4);
    let plain = vec![0x55u8; CHUNK];
    // Four new chunks evict the four canary chunks.
    let (seen, large) = armed(async {
        for h in 10..14 {
            put(&mut s, key(h), &plain).await;
        }
        sync(&mut s).await;
    })
    .await;
    assert_eq!(store.memory.stats.evictions.get(), 4);
    assert!(large >= 4, "the evicted buffers were freed ({large})");
    assert_eq!(seen, 0, "an evicted chunk was freed unwiped");

    // Overwritten in place: the old buffer goes.
    put(&mut s, key(20), &canary).await;
    sync(&mut s).await;
    let (seen, large) = armed(async {
        put(&mut s, key(20), &plain).await;
        sync(&mut s).await;
    })
    .await;
    assert!(large >= 1);
    assert_eq!(seen, 0, "an overwritten chunk was freed unwiped");

    // Shredded: every chunk of the namespace goes.
    put(&mut s, key(30), &canary).await;
    sync(&mut s).await;
    let (seen, large) = armed(async {
        let (chunks, _) = store.memory.shred(&kvgate_store::Owner::Shared);
        assert_eq!(chunks, 4);
    })
    .await;
    assert!(large >= 1);
    assert_eq!(seen, 0, "a shredded chunk was freed unwiped");
}
