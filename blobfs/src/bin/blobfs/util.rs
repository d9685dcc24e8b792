//! What every command shares: the error type, opening devices, parsing
//! sizes, and formatting bytes and times for people.

use std::io::Write;
use std::sync::Arc;

use blobstore::BlockDevice;

pub use blobfs::meta::utc;

/// An error for the user: one line, printed to stderr, exit code 1.
#[derive(Debug)]
pub struct CliError(pub String);

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

// `CliError` has no `Display`, so this blanket conversion cannot overlap
// `From<T> for T`.
impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

/// Prefixes an error with what was being done.
pub trait Ctx<T> {
    fn ctx(self, what: impl std::fmt::Display) -> CliResult<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> CliResult<T> {
        self.map_err(|e| CliError(format!("{what}: {e}")))
    }
}

/// Builds an error from a message.
pub fn fail<T>(msg: impl Into<String>) -> CliResult<T> {
    Err(CliError(msg.into()))
}

/// Opens the device a spec names (`mem:..`, `file:..`).
pub fn open_device(spec: &str) -> CliResult<Arc<dyn BlockDevice>> {
    blobstore::open_device(spec).ctx(format!("opening {spec}"))
}

pub use blobstore::util::{human_size, parse_size};

/// Writes to stdout; a reader that went away (`| head`) ends the output
/// quietly instead of failing.
pub fn print(text: &str) -> CliResult {
    write_stdout(text.as_bytes())
}

/// [`print`] for bytes.
pub fn write_stdout(bytes: &[u8]) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.ctx("writing to stdout"),
    }
}

/// A progress bar on stderr, drawn only when stderr is a terminal: piped or
/// redirected, every call is a no-op and nothing is printed. Commands that
/// copy bytes (import, export, backup, restore) count bytes; others (fsck)
/// can show a spinner with [`Progress::spinner`] and its message.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar for `total` bytes, labelled `what`.
    pub fn bytes(total: u64, what: &str) -> Progress {
        Progress::drawn(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            bar
        })
    }

    /// A spinner for work of unknown length, showing `what`.
    pub fn spinner(what: &str) -> Progress {
        Progress::drawn(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message(what.to_string());
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        })
    }

    /// No bar at all (for output that is itself the point, as `cat`).
    pub fn hidden() -> Progress {
        Progress(None)
    }

    fn drawn(make: impl FnOnce() -> indicatif::ProgressBar) -> Progress {
        use std::io::IsTerminal;
        Progress(std::io::stderr().is_terminal().then(make))
    }

    /// Counts `n` more bytes (or steps) done.
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(n);
        }
    }

    /// Changes the label (the file being copied, the phase of a check).
    pub fn set_message(&self, what: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(what.to_string());
        }
    }
}

impl Drop for Progress {
    /// Clears the bar, so the command's own output starts on a clean line.
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1MB").is_err());
        assert!(parse_size("M").is_err());
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(10), "10 B");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_000_000_000), "2023-11-14 22:13:20 UTC");
    }
}
