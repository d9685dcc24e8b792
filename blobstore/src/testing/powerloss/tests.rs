//! Tests of the power-loss device and its recovery: the spec options, what
//! [`recover`] makes of flushed, unflushed, overlapping and zeroing writes,
//! damaged and torn logs, the refusals (a log with pending writes, an image
//! in use), and, in child processes that SIGKILL themselves, the
//! self-inflicted power cut and a blobstore's synced blobs surviving it.

use super::*;
use crate::device::Lba;
use crate::device::{channel, open_device};
use crate::exec::block_on;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

const BS: usize = 4096;
const SECTORS: usize = 8;

/// A fresh image path (no file yet) and its cleanup.
struct Img(PathBuf);
impl Img {
    fn new() -> Img {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "powerloss-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(log_path(&p));
        Img(p)
    }
    fn spec(&self) -> String {
        format!("file:{}?size=1M&powerloss=on", self.0.display())
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}
impl Drop for Img {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(log_path(&self.0));
    }
}

fn buf(dev: &Arc<dyn BlockDevice>, len: usize, byte: u8) -> DmaBuf {
    let mut b = dev.alloc_buf(len).unwrap();
    b.fill(byte);
    b
}

/// Opens the image, runs `ops` on its channel, drops the device with no
/// further flush (the process "stops").
fn run(img: &Img, ops: impl FnOnce(&Arc<dyn BlockDevice>)) {
    let dev = open_device(&img.spec()).unwrap();
    ops(&dev);
    drop(dev);
}

fn write(dev: &Arc<dyn BlockDevice>, sector: u64, n: usize, byte: u8) {
    let ch = channel(dev).unwrap();
    block_on(ch.write(Lba(sector), buf(dev, n * BS, byte))).unwrap();
}

fn flush(dev: &Arc<dyn BlockDevice>) {
    block_on(channel(dev).unwrap().flush()).unwrap();
}

/// Writes 0x11 over the first `SECTORS` sectors, flushes, overwrites
/// them with 0x22 and stops without a flush.
fn flushed_then_overwritten(img: &Img) {
    run(img, |dev| {
        write(dev, 0, SECTORS, 0x11);
        flush(dev);
        write(dev, 0, SECTORS, 0x22);
    });
}

/// The fill byte of each of the first `SECTORS` sectors (panics on a
/// sector that is not uniform: recovery works in whole sectors).
fn sectors(img: &Img) -> Vec<u8> {
    let b = img.bytes();
    (0..SECTORS)
        .map(|i| {
            let s = &b[i * BS..(i + 1) * BS];
            assert!(s.iter().all(|&x| x == s[0]), "sector {i} is mixed");
            s[0]
        })
        .collect()
}

#[test]
fn spec_round_trips_and_rejects_bad_values() {
    let spec = "file:/tmp/x.img?size=4G&powerloss=on";
    let parsed = DeviceSpec::parse(spec).unwrap();
    assert!(matches!(parsed, DeviceSpec::PowerLoss { cut: None, .. }));
    assert_eq!(parsed.to_string(), spec);
    let spec =
        "file:/tmp/x.img?size=4G&powerloss=on&powerloss_cut_after=17&powerloss_cut_when=after";
    let parsed = DeviceSpec::parse(spec).unwrap();
    assert!(matches!(
        parsed,
        DeviceSpec::PowerLoss {
            cut: Some(PowerCut {
                after: 17,
                issued: true
            }),
            ..
        }
    ));
    assert_eq!(parsed.to_string(), spec);
    // `before` is the default.
    assert!(matches!(
        DeviceSpec::parse("file:/x?powerloss=on&powerloss_cut_after=3").unwrap(),
        DeviceSpec::PowerLoss {
            cut: Some(PowerCut {
                after: 3,
                issued: false
            }),
            ..
        }
    ));
    for (bad, why) in [
        ("file:/x?powerloss_cut_after=3", "need powerloss=on"),
        (
            "file:/x?powerloss=off&powerloss_cut_after=3",
            "need powerloss=on",
        ),
        (
            "file:/x?powerloss=on&powerloss_cut_after=0",
            "must be a positive number",
        ),
        (
            "file:/x?powerloss=on&powerloss_cut_after=x",
            "must be a positive number",
        ),
        (
            "file:/x?powerloss=on&powerloss_cut_when=after",
            "needs powerloss_cut_after",
        ),
        (
            "file:/x?powerloss=on&powerloss_cut_after=1&powerloss_cut_when=now",
            "must be before or after",
        ),
    ] {
        let err = DeviceSpec::parse(bad).unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
    assert!(matches!(
        DeviceSpec::parse("file:/tmp/x.img?powerloss=off").unwrap(),
        DeviceSpec::File { .. }
    ));
    let err = DeviceSpec::parse("file:/tmp/x.img?powerloss=yes").unwrap_err();
    assert!(
        err.to_string()
            .contains("powerloss=\"yes\" must be on or off"),
        "{err}"
    );
}

use crate::device::DeviceSpec;

#[test]
fn flushed_write_survives_every_seed() {
    for seed in 0..20 {
        let img = Img::new();
        run(&img, |dev| {
            write(dev, 0, SECTORS, 0xaa);
            flush(dev);
        });
        let r = recover(&img.0, seed).unwrap();
        assert_eq!(r.writes, 0, "{r}");
        assert_eq!(sectors(&img), vec![0xaa; SECTORS]);
        assert!(!log_path(&img.0).exists());
    }
}

#[test]
fn unflushed_write_comes_back_old_new_or_torn() {
    let (mut old, mut new, mut torn) = (0, 0, 0);
    for seed in 0..30 {
        let img = Img::new();
        flushed_then_overwritten(&img);
        // Before recovery the image holds what the process wrote.
        assert_eq!(sectors(&img), vec![0x22; SECTORS]);
        let r = recover(&img.0, seed).unwrap();
        assert_eq!(r.writes, 1, "{r}");
        let s = sectors(&img);
        assert!(s.iter().all(|&b| b == 0x11 || b == 0x22), "{s:?}");
        if s.iter().all(|&b| b == 0x11) {
            old += 1;
        } else if s.iter().all(|&b| b == 0x22) {
            new += 1;
        } else {
            torn += 1;
            assert_eq!(r.torn, 1, "{r}");
        }
    }
    assert!(
        old > 0 && new > 0 && torn > 0,
        "old {old} new {new} torn {torn}"
    );
}

#[test]
fn overlapping_unflushed_writes_leave_one_of_their_values() {
    let mut seen = HashSet::new();
    for seed in 0..40 {
        let img = Img::new();
        run(&img, |dev| {
            write(dev, 0, SECTORS, 0x11);
            flush(dev);
            write(dev, 0, SECTORS, 0x22);
            write(dev, 2, 4, 0x33);
        });
        recover(&img.0, seed).unwrap();
        let s = sectors(&img);
        for (i, &b) in s.iter().enumerate() {
            let ok = if (2..6).contains(&i) {
                [0x11, 0x22, 0x33].contains(&b)
            } else {
                [0x11, 0x22].contains(&b)
            };
            assert!(ok, "sector {i} = {b:#x} in {s:?}");
            seen.insert((i, b));
        }
    }
    // Every value each sector could hold showed up for some seed.
    for i in 2..6 {
        for b in [0x11, 0x22, 0x33] {
            assert!(seen.contains(&(i, b)), "sector {i} never {b:#x}");
        }
    }
}

#[test]
fn zeroes_and_unmap_are_undone_too() {
    let mut old = false;
    for seed in 0..20 {
        let img = Img::new();
        run(&img, |dev| {
            write(dev, 0, SECTORS, 0x44);
            flush(dev);
            let ch = channel(dev).unwrap();
            block_on(ch.write_zeroes(Lba(0), 4)).unwrap();
            block_on(ch.unmap(Lba(4), 4)).unwrap();
        });
        recover(&img.0, seed).unwrap();
        let s = sectors(&img);
        assert!(s.iter().all(|&b| b == 0x44 || b == 0), "{s:?}");
        old |= s.iter().all(|&b| b == 0x44);
    }
    assert!(old, "no seed restored the zeroed sectors");
}

#[test]
fn write_before_a_flush_completes_after_it_is_durable_only_when_covered() {
    // A write completed, flushed; another completed after the flush:
    // only the second is at risk.
    for seed in 0..10 {
        let img = Img::new();
        run(&img, |dev| {
            write(dev, 0, 4, 0x55);
            flush(dev);
            write(dev, 4, 4, 0x66);
        });
        recover(&img.0, seed).unwrap();
        let s = sectors(&img);
        assert_eq!(&s[..4], &[0x55; 4]);
        assert!(s[4..].iter().all(|&b| b == 0x66 || b == 0), "{s:?}");
    }
}

#[test]
fn missing_log_is_a_clear_error() {
    let img = Img::new();
    std::fs::write(&img.0, vec![0u8; 4096]).unwrap();
    let err = recover(&img.0, 1).unwrap_err().to_string();
    assert!(err.contains("reading the power-loss log"), "{err}");
    assert!(err.contains("opened with powerloss=on"), "{err}");
}

#[test]
fn corrupt_log_is_refused_and_the_image_left_alone() {
    let img = Img::new();
    flushed_then_overwritten(&img);
    let lp = log_path(&img.0);
    let mut log = std::fs::read(&lp).unwrap();
    let mid = HEADER_LEN + 100;
    log[mid] ^= 0xff;
    std::fs::write(&lp, &log).unwrap();
    let err = recover(&img.0, 1).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(sectors(&img), vec![0x22; SECTORS]);
    // A bad header too.
    log[0] = b'X';
    std::fs::write(&lp, &log).unwrap();
    let err = recover(&img.0, 1).unwrap_err().to_string();
    assert!(err.contains("not a power-loss log"), "{err}");
}

#[test]
fn torn_tail_record_is_ignored() {
    let img = Img::new();
    flushed_then_overwritten(&img);
    let lp = log_path(&img.0);
    let log = std::fs::read(&lp).unwrap();
    // Cut inside the record of the unflushed write: that write was never
    // issued as far as the log knows, so it is left as it is.
    std::fs::write(&lp, &log[..log.len() - 10]).unwrap();
    let r = recover(&img.0, 1).unwrap();
    assert!(r.torn_tail);
    assert_eq!(r.writes, 0);
}

#[test]
fn open_refuses_a_log_with_pending_writes() {
    let img = Img::new();
    run(&img, |dev| write(dev, 0, 1, 0x77));
    let err = open_device(&img.spec()).err().expect("open must fail");
    assert!(matches!(err, Error::Busy(_)), "{err}");
    assert!(err.to_string().contains("run power-loss recovery"), "{err}");
    recover(&img.0, 0).unwrap();
    drop(open_device(&img.spec()).unwrap());
}

#[test]
fn recover_refuses_an_image_in_use() {
    let img = Img::new();
    let dev = open_device(&img.spec()).unwrap();
    write(&dev, 0, 1, 0x77);
    let err = recover(&img.0, 0).unwrap_err();
    assert!(matches!(err, Error::Busy(_)), "{err}");
    drop(dev);
    recover(&img.0, 0).unwrap();
}

/// The child half of [`power_cut_option_kills_at_the_nth_op`]: runs
/// write 0x11 (op 1), flush (2), write 0x22 (3), write 0x33 over the
/// first half (4), flush (5) on the device `spec`, noting after each op
/// how many completed; exits 0 if no cut came.
fn cut_child(spec: &str, done: &Path) -> ! {
    let dev = open_device(spec).unwrap();
    let ch = channel(&dev).unwrap();
    let note = |n: u32| std::fs::write(done, n.to_string()).unwrap();
    block_on(async {
        ch.write(Lba(0), buf(&dev, SECTORS * BS, 0x11))
            .await
            .unwrap();
        note(1);
        ch.flush().await.unwrap();
        note(2);
        ch.write(Lba(0), buf(&dev, SECTORS * BS, 0x22))
            .await
            .unwrap();
        note(3);
        ch.write(Lba(0), buf(&dev, SECTORS / 2 * BS, 0x33))
            .await
            .unwrap();
        note(4);
        ch.flush().await.unwrap();
        note(5);
    });
    std::process::exit(0)
}

#[test]
fn power_cut_option_kills_at_the_nth_op() {
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "POWERLOSS_TEST_CUT_SPEC";
    if let Some(spec) = std::env::var_os(CHILD) {
        let spec = spec.into_string().unwrap();
        let done = std::env::var_os("POWERLOSS_TEST_CUT_DONE").unwrap();
        cut_child(&spec, Path::new(&done));
    }
    let mut seen = HashSet::new();
    for (after, when) in [(2u64, "before"), (2, "after"), (4, "before"), (4, "after")] {
        for seed in 0..8 {
            let img = Img::new();
            let done = img.0.with_extension("done");
            let spec = format!(
                "{}&powerloss_cut_after={after}&powerloss_cut_when={when}",
                img.spec()
            );
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "testing::powerloss::tests::power_cut_option_kills_at_the_nth_op",
                    "--exact",
                    "--test-threads=1",
                ])
                .env(CHILD, &spec)
                .env("POWERLOSS_TEST_CUT_DONE", &done)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            let what = format!("cut after {after} {when}, seed {seed}");
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{what}: {status:?}");
            // The ops before the cut completed, the cut one did not.
            let n: u64 = std::fs::read_to_string(&done).unwrap().parse().unwrap();
            std::fs::remove_file(&done).unwrap();
            assert_eq!(n, after - 1, "{what}");
            let before = sectors(&img);
            let r = recover(&img.0, seed).unwrap();
            let s = sectors(&img);
            if after == 2 {
                // Cut at the first flush: the first write never became
                // durable.
                assert_eq!(before, vec![0x11; SECTORS], "{what}");
                assert_eq!(r.writes, 1, "{what}: {r}");
                assert!(s.iter().all(|&b| b == 0 || b == 0x11), "{what}: {s:?}");
            } else {
                // Cut at the 0x33 write: it was logged (so it can be
                // undone) along with the unflushed 0x22 write.
                assert_eq!(r.writes, 2, "{what}: {r}");
                if when == "before" {
                    // Never handed to the device.
                    assert_eq!(before, vec![0x22; SECTORS], "{what}");
                }
                for (i, &b) in s.iter().enumerate() {
                    let ok = if i < SECTORS / 2 {
                        [0x11, 0x22, 0x33].contains(&b)
                    } else {
                        [0x11, 0x22].contains(&b)
                    };
                    assert!(ok, "{what}: sector {i} = {b:#x} in {s:?}");
                    seen.insert((after, i, b));
                }
            }
            assert!(!log_path(&img.0).exists());
        }
    }
    // The power cut reached back past the cut op: some seed restored the
    // last flushed value, some kept the cut write.
    assert!(seen.contains(&(4, 0, 0x11)), "{seen:?}");
    assert!(seen.contains(&(4, 0, 0x33)), "{seen:?}");
}

/// The child half of [`blobstore_on_powerloss_keeps_synced_blobs`]:
/// formats the image, makes one blob durable, changes more without a
/// flush, and SIGKILLs itself.
fn blobstore_child(image: &Path) -> ! {
    use crate::{BlobOptions, Blobstore, BlobstoreOptions};
    let spec = format!("file:{}?size=64M&powerloss=on", image.display());
    let dev = open_device(&spec).unwrap();
    block_on(async {
        let bs = Blobstore::init(dev.clone(), BlobstoreOptions::default())
            .await
            .unwrap();
        let len = bs.cluster_size() as usize;
        let opts = || BlobOptions {
            num_clusters: 1,
            ..Default::default()
        };
        // Written, its metadata synced, the device flushed: durable.
        let synced = bs.create_blob(opts()).await.unwrap();
        let b = bs.open_blob(synced).await.unwrap();
        b.write(0, buf(&dev, len, 0x5a)).await.unwrap();
        b.sync_metadata().await.unwrap();
        channel(&dev).unwrap().flush().await.unwrap();
        std::fs::write(image.with_extension("id"), synced.0.to_string()).unwrap();
        // Then an overwrite and more blobs, never flushed.
        b.write(0, buf(&dev, len / 2, 0xa5)).await.unwrap();
        for _ in 0..3 {
            let id = bs.create_blob(opts()).await.unwrap();
            let u = bs.open_blob(id).await.unwrap();
            u.write(0, buf(&dev, len, 0x77)).await.unwrap();
            u.sync_metadata().await.unwrap();
        }
    });
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL returned");
}

#[test]
fn blobstore_on_powerloss_keeps_synced_blobs() {
    use crate::{BlobId, Blobstore, LoadOptions};
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "POWERLOSS_TEST_CHILD_IMAGE";
    if let Some(image) = std::env::var_os(CHILD) {
        blobstore_child(Path::new(&image));
    }
    let mut fates = [0u64; 3];
    for seed in 0..6 {
        let img = Img::new();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "testing::powerloss::tests::blobstore_on_powerloss_keeps_synced_blobs",
                "--exact",
                "--test-threads=1",
            ])
            .env(CHILD, &img.0)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        let id_file = img.0.with_extension("id");
        let synced = BlobId(std::fs::read_to_string(&id_file).unwrap().parse().unwrap());
        std::fs::remove_file(&id_file).unwrap();
        let r = recover(&img.0, seed).unwrap();
        assert!(r.writes > 0, "{r}");
        fates[0] += r.undone;
        fates[1] += r.kept;
        fates[2] += r.torn;
        let dev = open_device(&format!("file:{}", img.0.display())).unwrap();
        block_on(async {
            let bs = Blobstore::load(dev.clone(), LoadOptions::default())
                .await
                .unwrap();
            let len = bs.cluster_size() as usize;
            let b = bs.open_blob(synced).await.unwrap();
            let got = b.read(0, dev.alloc_buf(len).unwrap()).await.unwrap();
            let got = &got[..];
            // The first half holds, sector by sector, the flushed bytes
            // or the unflushed overwrite; the second half was never
            // overwritten.
            assert!(got[..len / 2].iter().all(|&x| x == 0x5a || x == 0xa5));
            assert!(got[len / 2..].iter().all(|&x| x == 0x5a));
            b.close().await.unwrap();
            bs.unload().await.unwrap();
        });
    }
    assert!(fates.iter().all(|&n| n > 0), "undone/kept/torn: {fates:?}");
}
