//! Tests of the reactors: message hops, I/O kept in flight, idle policies,
//! pollers, shutdown, panics and core pinning.

use super::*;
use crate::device::{
    thread_in_flight, BlockDevice, ChannelBackend, DeviceId, Geometry, IoOp, Lba, Tag,
};
use crate::error::{Error, Result};
use crate::{block_on, channel, DmaBuf, MemDevice};
use futures::channel::oneshot;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::task::Poll;
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn unpinned(count: usize) -> Reactors {
    Reactors::start_unpinned(count).expect("start reactors")
}

/// A memory device whose channels hold completions back until `batch`
/// operations are outstanding (or the oldest waited `hold`), so a test
/// can see how many I/Os a thread really keeps in flight.
struct HeldDevice {
    inner: MemDevice,
    id: DeviceId,
    batch: usize,
    hold: Duration,
    max_outstanding: Arc<AtomicUsize>,
}

struct HeldBackend {
    inner: Box<dyn ChannelBackend>,
    batch: usize,
    hold: Duration,
    held: Vec<(Tag, Result<()>)>,
    outstanding: usize,
    oldest: Option<Instant>,
    max_outstanding: Arc<AtomicUsize>,
}

impl BlockDevice for HeldDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("held:{}", self.inner.name())
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(HeldBackend {
            inner: self.inner.new_backend()?,
            batch: self.batch,
            hold: self.hold,
            held: Vec::new(),
            outstanding: 0,
            oldest: None,
            max_outstanding: self.max_outstanding.clone(),
        }))
    }
}

impl ChannelBackend for HeldBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        self.inner.submit(tag, op)?;
        self.outstanding += 1;
        self.max_outstanding
            .fetch_max(self.outstanding, Ordering::Relaxed);
        self.oldest.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let held = &mut self.held;
        self.inner.reap(&mut |t, r| held.push((t, r)));
        let due = self.oldest.is_some_and(|t| t.elapsed() >= self.hold);
        if held.is_empty() || (held.len() < self.batch && !due) {
            return 0;
        }
        let n = held.len();
        for (t, r) in held.drain(..) {
            done(t, r);
        }
        self.outstanding -= n;
        self.oldest = (self.outstanding > 0).then(Instant::now);
        n
    }
}

fn held_device(
    batch: usize,
    hold: Duration,
) -> (Arc<dyn BlockDevice>, MemDevice, Arc<AtomicUsize>) {
    let mem = MemDevice::new(8 << 20, 4096).unwrap();
    let max = Arc::new(AtomicUsize::new(0));
    let dev: Arc<dyn BlockDevice> = Arc::new(HeldDevice {
        inner: mem.clone(),
        id: DeviceId::fresh(),
        batch,
        hold,
        max_outstanding: max.clone(),
    });
    (dev, mem, max)
}

/// Forwards a counter back and forth between two reactors.
fn hop(
    all: Arc<Vec<ReactorHandle>>,
    left: usize,
    expected: usize,
    done: mpsc::Sender<std::result::Result<(), String>>,
) {
    let here = current().map(|h| h.index());
    if here != Some(expected) {
        let _ = done.send(Err(format!("hop {left} ran on {here:?}, not {expected}")));
        return;
    }
    if left == 0 {
        let _ = done.send(Ok(()));
        return;
    }
    let next = 1 - expected;
    let target = all[next].clone();
    let sent = target.send(move || hop(all, left - 1, next, done.clone()));
    if let Err(e) = sent {
        panic!("send failed: {e}");
    }
}

#[test]
fn ping_pong_10000_hops() {
    let r = unpinned(2);
    let all = Arc::new(r.handles().to_vec());
    let (tx, rx) = mpsc::channel();
    let first = all.clone();
    all[0].send(move || hop(first, 10_000, 0, tx)).unwrap();
    assert_eq!(rx.recv_timeout(WAIT), Ok(Ok(())));
    r.shutdown().unwrap();
}

#[test]
fn one_task_keeps_32_ios_in_flight() {
    const TASKS: usize = 32;
    const BLOCKS_EACH: u64 = 8;
    let (dev, mem, max) = held_device(TASKS, Duration::from_millis(200));
    let r = unpinned(1);
    let task_dev = dev.clone();
    let h = r.handle(0).unwrap().spawn(move || async move {
        let ch = channel(&task_dev)?;
        let mut subs = Vec::new();
        for t in 0..TASKS {
            let ch = ch.clone();
            subs.push(spawn_local(async move {
                for b in 0..BLOCKS_EACH {
                    let lba = t as u64 * BLOCKS_EACH + b;
                    let buf = DmaBuf::from_slice(&[(lba % 251) as u8 + 1; 4096])?;
                    ch.write(Lba(lba), buf).await?;
                }
                for b in 0..BLOCKS_EACH {
                    let lba = t as u64 * BLOCKS_EACH + b;
                    let buf = ch.read(Lba(lba), DmaBuf::new(4096)?).await?;
                    if buf.iter().any(|&x| x != (lba % 251) as u8 + 1) {
                        return Err(Error::corrupt(format!("block {lba}"), "bad pattern"));
                    }
                }
                Ok::<(), Error>(())
            })?);
        }
        for res in futures::future::join_all(subs).await {
            res??;
        }
        Ok::<usize, Error>(thread_in_flight())
    });
    assert_eq!(h.unwrap().join().unwrap().unwrap(), 0);
    assert_eq!(max.load(Ordering::Relaxed), TASKS, "I/Os in flight at once");
    let mut byte = [0u8; 1];
    for lba in 0..TASKS as u64 * BLOCKS_EACH {
        mem.load_bytes(lba as usize * 4096 + 4095, &mut byte);
        assert_eq!(byte[0], (lba % 251) as u8 + 1, "block {lba}");
    }
    r.shutdown().unwrap();
}

#[test]
fn block_on_works_beside_reactors() {
    let mem = MemDevice::new(4 << 20, 512).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let r = unpinned(2);
    let mut handles = Vec::new();
    for (i, h) in r.handles().iter().enumerate() {
        let dev = dev.clone();
        handles.push(
            h.spawn(move || async move {
                let ch = channel(&dev)?;
                for k in 0..200u64 {
                    let lba = i as u64 * 1000 + k;
                    ch.write(Lba(lba), DmaBuf::from_slice(&[i as u8 + 1; 512])?)
                        .await?;
                }
                Ok::<(), Error>(())
            })
            .unwrap(),
        );
    }
    // Meanwhile, a plain thread does its own I/O with block_on.
    let ch = channel(&dev).unwrap();
    for k in 0..200u64 {
        let buf = DmaBuf::from_slice(&[9u8; 512]).unwrap();
        block_on(ch.write(Lba(5000 + k), buf)).unwrap();
        let back = block_on(ch.read(Lba(5000 + k), DmaBuf::new(512).unwrap())).unwrap();
        assert!(back.iter().all(|&x| x == 9));
    }
    for h in handles {
        block_on(h).unwrap().unwrap();
    }
    let snap = mem.snapshot();
    assert!(snap[1000 * 512..1200 * 512].iter().all(|&x| x == 2));
    r.shutdown().unwrap();
}

#[test]
fn block_policy_waits_in_the_device_and_still_runs_messages() {
    // A file device blocks in io_uring; memory cannot block, so the
    // reactor yields instead. Either way the I/O completes, checked.
    let path = std::env::temp_dir().join(format!("reactor-block-{}", std::process::id()));
    let file: Arc<dyn BlockDevice> = Arc::new(
        crate::device::FileDevice::open(
            &path,
            crate::device::FileOptions {
                size_bytes: Some(4 << 20),
                create: Some(true),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let _ = std::fs::remove_file(&path);
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20, 4096).unwrap());
    let r = Reactors::builder()
        .unpinned(1)
        .idle_policy(IdlePolicy::Block {
            spin: Duration::from_micros(5),
        })
        .start()
        .unwrap();
    for dev in [file, mem] {
        let h = r
            .handle(0)
            .unwrap()
            .spawn(move || async move {
                let ch = channel(&dev)?;
                for k in 0..100u64 {
                    let data = vec![(k % 251) as u8 + 1; 4096];
                    ch.write(Lba(k * 8), DmaBuf::from_slice(&data)?).await?;
                    let back = ch.read(Lba(k * 8), DmaBuf::new(4096)?).await?;
                    assert!(back[..] == data[..], "block {k}");
                }
                Ok::<(), Error>(())
            })
            .unwrap();
        h.join().unwrap().unwrap();
    }
    // Idle now: a message from another thread still arrives promptly.
    let (tx, rx) = mpsc::channel();
    r.handle(0)
        .unwrap()
        .send(move || tx.send(7).unwrap())
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(7));
    r.shutdown().unwrap();
}

#[test]
fn wake_from_plain_thread_unparks_a_sleeping_reactor() {
    // With a 30 s sleep bound, only the unpark can make this quick.
    let r = Reactors::builder()
        .unpinned(1)
        .idle_policy(IdlePolicy::Sleep {
            after: Duration::from_micros(10),
            max_sleep: Duration::from_secs(30),
        })
        .start()
        .unwrap();
    for round in 0..20u32 {
        let (tx, rx) = oneshot::channel::<u32>();
        let h = r
            .handle(0)
            .unwrap()
            .spawn(move || async move { rx.await.map(|v| v + 1).ok() })
            .unwrap();
        let t0 = Instant::now();
        let waker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(5));
            tx.send(round).unwrap();
        });
        assert_eq!(h.join().unwrap(), Some(round + 1));
        assert!(t0.elapsed() < Duration::from_secs(5), "wake was lost");
        waker.join().unwrap();
    }
    // A message to the sleeping reactor arrives promptly too.
    let (tx, rx) = mpsc::channel();
    thread::sleep(Duration::from_millis(5));
    r.handle(0)
        .unwrap()
        .send(move || tx.send(()).unwrap())
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(()));
    // Shutdown wakes it as well.
    let t0 = Instant::now();
    r.shutdown().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn pollers_register_and_unregister() {
    let r = unpinned(1);
    let h = r.handle(0).unwrap().clone();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let id = h
        .register_poller(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            0
        })
        .unwrap();
    let t0 = Instant::now();
    while runs.load(Ordering::Relaxed) < 20 {
        assert!(t0.elapsed() < WAIT, "poller never ran");
        thread::sleep(Duration::from_millis(1));
    }
    h.unregister_poller(id).unwrap();
    // Messages run in order: once this one ran, the poller is gone.
    h.spawn(|| async {}).unwrap().join().unwrap();
    let after = runs.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(20));
    assert_eq!(runs.load(Ordering::Relaxed), after);

    // A local, !Send poller that unregisters itself after 5 runs, and
    // one poller per reactor rejected on the wrong reactor.
    let local_runs = h
        .spawn(|| async {
            let runs = Rc::new(Cell::new(0usize));
            let me: Rc<Cell<Option<PollerId>>> = Rc::new(Cell::new(None));
            let (r2, me2) = (runs.clone(), me.clone());
            let id = register_local_poller(move || {
                r2.set(r2.get() + 1);
                if r2.get() == 5 {
                    assert!(unregister_local_poller(me2.get().unwrap()));
                }
                1
            })?;
            me.set(Some(id));
            // Let the reactor loop run the poller a while.
            for _ in 0..50 {
                yield_once().await;
            }
            assert!(!unregister_local_poller(id), "already gone");
            Ok::<usize, Error>(runs.get())
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(local_runs, 5);
    assert!(register_local_poller(|| 0).is_err(), "not a reactor thread");
    r.shutdown().unwrap();
}

/// Pending once, waking itself: lets the reactor loop go round.
async fn yield_once() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

#[test]
fn shutdown_runs_queued_messages_and_cancels_pending_tasks() {
    let (dev, _mem, _max) = held_device(1000, Duration::from_millis(100));
    let r = Reactors::builder()
        .unpinned(2)
        .drain_timeout(Duration::from_secs(10))
        .start()
        .unwrap();
    let h0 = r.handle(0).unwrap().clone();
    // Tasks that never finish: one on nothing, one on held-back I/O.
    let forever = h0.spawn(futures::future::pending::<()>).unwrap();
    let io_dev = dev.clone();
    let (started_tx, started_rx) = mpsc::channel();
    let io = h0
        .spawn(move || async move {
            let ch = channel(&io_dev)?;
            let writes: Vec<_> = (0..4).map(|lba| ch.write_zeroes(Lba(lba), 1)).collect();
            started_tx.send(thread_in_flight()).unwrap();
            futures::future::join_all(writes).await;
            futures::future::pending::<()>().await;
            Ok::<(), Error>(())
        })
        .unwrap();
    assert_eq!(started_rx.recv_timeout(WAIT), Ok(4));
    // Keep reactor 1 busy so that messages queue up behind it.
    let h1 = r.handle(1).unwrap().clone();
    h1.send(|| thread::sleep(Duration::from_millis(100)))
        .unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let ran = ran.clone();
        h1.send(move || {
            ran.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    }
    let t0 = Instant::now();
    r.shutdown().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(ran.load(Ordering::SeqCst), 10, "queued messages ran");
    assert!(matches!(forever.join(), Err(Error::Shutdown(_))));
    assert!(matches!(block_on(io), Err(Error::Shutdown(_))));
    assert!(matches!(h0.send(|| {}), Err(Error::Shutdown(_))));
    assert!(h0.spawn(|| async {}).is_err());
    assert!(h0.is_closed());
}

#[test]
fn panics_are_contained_and_reported() {
    let r = unpinned(1);
    let h = r.handle(0).unwrap();
    let bad = h.spawn(|| async { panic!("boom") }).unwrap();
    let err = bad.join().unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    h.send(|| panic!("message boom")).unwrap();
    h.register_poller(|| panic!("poller boom")).unwrap();
    // The reactor still works.
    assert_eq!(h.spawn(|| async { 7 }).unwrap().join().unwrap(), 7);
    r.shutdown().unwrap();
}

#[test]
fn join_on_own_reactor_is_refused_and_spawn_local_needs_a_reactor() {
    assert!(matches!(
        spawn_local(async {}),
        Err(Error::InvalidArgument(_))
    ));
    assert!(current().is_none());
    let r = unpinned(1);
    let h = r.handle(0).unwrap();
    let res = h
        .spawn(|| async {
            let inner = spawn_local(async { 1 }).unwrap();
            let refused = matches!(inner.join(), Err(Error::Busy(_)));
            let again = spawn_local(async { 2 }).unwrap().await.unwrap();
            (refused, again, current().unwrap().is_current())
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(res, (true, 2, true));
    r.shutdown().unwrap();
}

#[test]
fn spin_policy_and_drop_shut_down() {
    let r = Reactors::builder()
        .unpinned(1)
        .idle_policy(IdlePolicy::Spin)
        .start()
        .unwrap();
    let h = r.handle(0).unwrap().spawn(|| async { 3 }).unwrap();
    assert_eq!(h.join().unwrap(), 3);
    let pending = r
        .handle(0)
        .unwrap()
        .spawn(futures::future::pending::<()>)
        .unwrap();
    drop(r);
    assert!(matches!(pending.join(), Err(Error::Shutdown(_))));
}

#[test]
fn pinning_checks_cores() {
    let allowed = allowed_cores().unwrap();
    assert!(!allowed.is_empty());
    assert!(matches!(
        Reactors::start(&[]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Reactors::start(&[100_000]),
        Err(Error::InvalidArgument(_))
    ));
    let c = allowed[0];
    assert!(matches!(
        Reactors::start(&[c, c]),
        Err(Error::InvalidArgument(_))
    ));
    if let Some(missing) = (0..libc::CPU_SETSIZE as usize).find(|c| !allowed.contains(c)) {
        let err = Reactors::start(&[missing]).unwrap_err();
        assert!(err.to_string().contains("not in"), "{err}");
    }
    let r = Reactors::start(&[c]).unwrap();
    assert_eq!(r.handle(0).unwrap().core(), Some(c));
    let seen = r
        .handle(0)
        .unwrap()
        .spawn(|| async { allowed_cores() })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(seen, vec![c]);
    r.shutdown().unwrap();
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<ReactorHandle>();
    send::<JoinHandle<u32>>();
    send::<Reactors>();
    let _ = RecvTimeoutError::Timeout;
}
