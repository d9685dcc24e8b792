//! Exclusive locks on the files behind devices.
//!
//! A file or shm device holds an exclusive `flock` on its file while it is
//! open, so two blobstores never share one file; power-loss recovery takes
//! the same lock.
//!
//! Invariant: every holder releases its lock with an explicit `LOCK_UN`, never
//! by closing the descriptor alone. A `flock` belongs to the open file
//! description, and a process that another thread forks meanwhile (any
//! `Command::spawn`) shares that description until it execs. Closing our
//! descriptor would then leave the lock with the child for a moment, and an
//! open of the file right after would fail with [`Error::Busy`]. `LOCK_UN`
//! releases it for every sharer at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// An open file and the exclusive lock on it, released when this is
/// dropped (or handed on to the device that locked it, which then owns the lock).
#[derive(Debug)]
pub struct FileLock {
    /// `Some` until [`FileLock::into_file`] takes it.
    file: Option<File>,
}

impl FileLock {
    /// Locks `file` (opened from `path`) exclusively, failing at once with
    /// [`Error::Busy`] if another open file description holds the lock.
    pub fn exclusive(file: File, path: &Path) -> Result<FileLock> {
        if try_lock(&file, path)? {
            Ok(FileLock { file: Some(file) })
        } else {
            tracing::warn!(path = %path.display(), "device refused: locked by another opener");
            Err(Error::Busy(format!(
                "{} is in use by another process/blobstore (it holds an exclusive lock on it)",
                path.display()
            )))
        }
    }

    /// Like [`FileLock::exclusive`], but waits up to `wait` for the holder
    /// to let go: a process just killed keeps the lock until the kernel has
    /// torn down its io_uring (and the file reference the ring holds), after
    /// the process is reaped.
    pub fn wait_exclusive(file: File, path: &Path, wait: Duration) -> Result<FileLock> {
        let deadline = Instant::now() + wait;
        loop {
            if try_lock(&file, path)? {
                return Ok(FileLock { file: Some(file) });
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "{} is still locked after {} ms: another process has it open",
                    path.display(),
                    wait.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file, still locked: the caller now owns the lock and must release
    /// it with [`unlock`] (a device does so when it is dropped, while its
    /// channels may keep the descriptor open a while longer).
    pub(super) fn into_file(mut self) -> File {
        self.file
            .take()
            .expect("FileLock holds its file until into_file")
    }
}

impl std::ops::Deref for FileLock {
    type Target = File;

    fn deref(&self) -> &File {
        self.file
            .as_ref()
            .expect("FileLock holds its file until into_file")
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            unlock(file);
        }
    }
}

/// Releases the lock `file`'s open file description holds, for every process
/// that shares it. A file that holds no lock is left as it is.
pub(super) fn unlock(file: &File) {
    // SAFETY: the descriptor is open (we hold the File); flock takes no
    // pointers.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Tries once to lock `file` exclusively: `Ok(false)` if another open file
/// description holds the lock.
fn try_lock(file: &File, path: &Path) -> Result<bool> {
    loop {
        // SAFETY: the descriptor is open for the duration of the call; flock
        // takes no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => {
                return Err(Error::Os {
                    context: format!("locking {}", path.display()),
                    source: e,
                })
            }
        }
    }
}

/// Waits up to `wait` until no device or process holds the lock on `path`
/// (a file or shm image, or a block device), for harnesses that kill a
/// process and then reopen its device. A missing file counts as unlocked.
/// Fails with [`Error::Busy`] if the lock is still held at the deadline.
pub fn wait_unlocked(path: &Path, wait: Duration) -> Result<()> {
    match File::open(path) {
        Ok(file) => FileLock::wait_exclusive(file, path, wait).map(drop),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Os {
            context: format!("opening {}", path.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn tmp(name: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("blobstore-lock-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        Tmp(p)
    }

    /// A descriptor sharing `file`'s open file description, as a child
    /// forked before its exec holds one.
    fn share(file: &File) -> File {
        file.try_clone().unwrap()
    }

    #[test]
    fn dropping_the_lock_releases_it_for_a_sharer_too() {
        let t = tmp("release");
        let lock = FileLock::exclusive(File::open(&t.0).unwrap(), &t.0).unwrap();
        let forked = share(&lock);
        assert!(matches!(
            FileLock::exclusive(File::open(&t.0).unwrap(), &t.0),
            Err(Error::Busy(_))
        ));
        drop(lock);
        FileLock::exclusive(File::open(&t.0).unwrap(), &t.0).unwrap();
        drop(forked);
    }

    /// What the explicit release is for: closing the descriptor alone leaves
    /// the lock with whoever shares it.
    #[test]
    fn closing_alone_would_leave_the_lock_with_a_sharer() {
        let t = tmp("close");
        let file = FileLock::exclusive(File::open(&t.0).unwrap(), &t.0)
            .unwrap()
            .into_file();
        let forked = share(&file);
        drop(file);
        assert!(matches!(
            FileLock::exclusive(File::open(&t.0).unwrap(), &t.0),
            Err(Error::Busy(_))
        ));
        unlock(&forked);
        FileLock::exclusive(File::open(&t.0).unwrap(), &t.0).unwrap();
    }

    #[test]
    fn wait_unlocked_waits_for_the_holder_and_gives_up_at_the_deadline() {
        let t = tmp("wait");
        wait_unlocked(&t.0, Duration::ZERO).unwrap();
        let lock = FileLock::exclusive(File::open(&t.0).unwrap(), &t.0).unwrap();
        let err = wait_unlocked(&t.0, Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(&err, Error::Busy(m) if m.contains("still locked")),
            "{err}"
        );
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(lock);
        });
        wait_unlocked(&t.0, Duration::from_secs(10)).unwrap();
        holder.join().unwrap();
        let missing = t.0.with_extension("missing");
        wait_unlocked(&missing, Duration::ZERO).unwrap();
    }
}
