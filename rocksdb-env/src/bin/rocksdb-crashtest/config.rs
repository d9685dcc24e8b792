//! The driver's command line: the crash [`Mode`]s, the settings a run
//! takes ([`Config`]) and [`parse_args`], which checks them.

use std::path::PathBuf;

/// Which crash the driver simulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// SIGKILL of the process.
    Kill,
    /// SIGKILL of the process, and nothing acknowledged may be lost: no
    /// `--sync_fault_injection`, so db_stress expects every write it was
    /// told succeeded, as on POSIX after a process crash; every round keeps
    /// its WAL (without one the memtable is lost on any file system).
    Strict,
    /// SIGKILL, then a simulated power cut on the image.
    PowerLoss,
    /// No kill: every round runs its operations to the end.
    Plain,
}

impl Mode {
    /// The mode's name, as `--mode` takes it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Kill => "kill",
            Mode::Strict => "strict",
            Mode::PowerLoss => "powerloss",
            Mode::Plain => "plain",
        }
    }
}

/// Command-line settings.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// `--db-stress`: the db_stress binary to run.
    pub(crate) db_stress: PathBuf,
    /// `--mode` (`kill` by default).
    pub(crate) mode: Mode,
    /// `--rounds`: how many rounds before the final verification.
    pub(crate) rounds: u32,
    /// `--seed`: what the knobs are drawn from (the clock by default).
    pub(crate) seed: u64,
    /// `--dir`: where the image (unless `--device`), the expected values
    /// and the logs go.
    pub(crate) dir: PathBuf,
    /// `--min-secs`: the shortest time a round's workload runs before the
    /// kill.
    pub(crate) min_secs: f64,
    /// `--max-secs`: the longest.
    pub(crate) max_secs: f64,
    /// `--size`: the image file's size, as the device spec takes it.
    pub(crate) size: String,
    /// db_stress's own fault injection on (see the crate docs in main.rs).
    pub(crate) faults: bool,
    /// `--write-faults N`: write and metadata-write faults at 1 in N in
    /// every round with a WAL, instead of db_crashtest's 1 in 128 or 1000.
    pub(crate) write_faults: Option<u32>,
    /// Operations per thread of a `plain` round.
    pub(crate) ops: u64,
    /// A device spec to run on instead of an image file in `dir`.
    pub(crate) device: Option<String>,
}

/// The usage line, printed with `--help` and after most argument errors.
const USAGE: &str =
    "usage: rocksdb-crashtest --db-stress <path> [--mode kill|strict|powerloss|plain] \
[--rounds N] [--seed S] [--dir DIR] [--min-secs A] [--max-secs B] [--size 4G] [--faults] \
[--write-faults N] [--ops N] [--device SPEC]";

/// The settings the arguments (the program's name left out) ask for, with
/// the defaults for what they leave out; `Err` holds the message to print
/// when they are wrong or `--help` asks for the usage.
pub(crate) fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config {
        db_stress: PathBuf::new(),
        mode: Mode::Kill,
        rounds: 5,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1),
        dir: std::env::temp_dir().join(format!("rocksdb-crashtest-{}", std::process::id())),
        min_secs: 2.0,
        max_secs: 10.0,
        size: "4G".into(),
        faults: false,
        write_faults: None,
        ops: 5_000,
        device: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let num = |v: String, what: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{what} {v:?} is not a non-negative number"))
        };
        match flag.as_str() {
            "--db-stress" => cfg.db_stress = PathBuf::from(value()?),
            "--mode" => {
                cfg.mode = match value()?.as_str() {
                    "kill" => Mode::Kill,
                    "strict" => Mode::Strict,
                    "powerloss" => Mode::PowerLoss,
                    "plain" => Mode::Plain,
                    m => {
                        return Err(format!(
                            "--mode {m:?}: expected kill, strict, powerloss or plain"
                        ))
                    }
                }
            }
            "--rounds" => {
                let v = value()?;
                cfg.rounds = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--rounds {v:?} is not a positive number"))?
            }
            "--seed" => {
                let v = value()?;
                cfg.seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?} is not a number"))?
            }
            "--dir" => cfg.dir = PathBuf::from(value()?),
            "--min-secs" => cfg.min_secs = num(value()?, "--min-secs")?,
            "--max-secs" => cfg.max_secs = num(value()?, "--max-secs")?,
            "--size" => cfg.size = value()?,
            "--faults" => cfg.faults = true,
            "--write-faults" => {
                let v = value()?;
                cfg.write_faults = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &u32| n > 0)
                        .ok_or_else(|| format!("--write-faults {v:?} is not a positive number"))?,
                )
            }
            "--device" => {
                let v = value()?;
                blobstore::device::DeviceSpec::parse(&v)
                    .map_err(|e| format!("--device {v:?}: {e}"))?;
                cfg.device = Some(v)
            }
            "--ops" => {
                let v = value()?;
                cfg.ops = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--ops {v:?} is not a positive number"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if cfg.db_stress.as_os_str().is_empty() {
        return Err(format!("--db-stress is required\n{USAGE}"));
    }
    if cfg.write_faults.is_some() && !cfg.faults {
        return Err("--write-faults needs --faults".into());
    }
    if cfg.device.is_some() && cfg.mode == Mode::PowerLoss {
        return Err("--device: the powerloss mode plays its cuts on an image file".into());
    }
    if cfg.min_secs > cfg.max_secs {
        return Err(format!(
            "--min-secs {} is above --max-secs {}",
            cfg.min_secs, cfg.max_secs
        ));
    }
    Ok(cfg)
}
