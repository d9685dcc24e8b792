//! Tests of the waits for a file's write behind the appender
//! ([`super::behind`]).

use super::behind::Behind;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Runs `wait` and, beside it on the same thread, a task that lets a
/// writer thread end the write `b` has in flight: with a wait that
/// blocked its thread, that task never ran (the writer gives up after
/// a while and says so).
fn ends_beside(b: &Arc<Behind>, wait: impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || {
            let told = rx.recv_timeout(Duration::from_secs(10)).is_ok();
            b.finish(Err("the test's write".into()));
            told
        })
    };
    blobstore::block_on(futures::future::join(wait, async move {
        tx.send(()).expect("writer thread");
    }));
    assert!(writer.join().unwrap(), "the wait blocked its thread");
}

#[test]
fn waits_for_the_writer_yield_their_thread() {
    let b = Arc::new(Behind::default());
    b.start(0, 8192);
    ends_beside(&b, async {
        let outcome = b.idle().await;
        assert!(matches!(outcome, Some(Err(ref e)) if e == "the test's write"));
    });
    assert!(b.is_quiet(), "the outcome was taken");

    b.start(4096, 8192);
    // Clear of the write at once: no wait.
    blobstore::block_on(b.clear(0, 4096));
    ends_beside(&b, b.clear(0, 4097));
    assert!(!b.busy.load(Ordering::Acquire));
}

#[test]
fn a_plain_wait_parks_until_the_write_ends() {
    let b = Arc::new(Behind::default());
    b.start(0, 4096);
    b.clear_blocking(4096, 8192);
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.finish(Err("late".into()));
        })
    };
    let start = std::time::Instant::now();
    b.clear_blocking(0, 1);
    assert!(start.elapsed() >= Duration::from_millis(15));
    writer.join().unwrap();
    assert!(matches!(
        blobstore::block_on(b.idle()),
        Some(Err(ref e)) if e == "late"
    ));
}
