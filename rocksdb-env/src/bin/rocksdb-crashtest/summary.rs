//! A run's totals: [`Summary`], with a [`CutTotals`] for each kind of stop
//! the power cuts followed, and [`print_summary`], the table printed at the
//! end of a run.

use std::fmt::Write as _;
use std::time::Duration;

use blobstore::testing::powerloss;

use crate::config::{Config, Mode};
use crate::knobs::RunKnobs;

/// What the power cuts after one kind of stop found and did.
#[derive(Default, Debug)]
pub(crate) struct CutTotals {
    /// Rounds stopped this way whose image went through recovery.
    rounds: u32,
    /// Of those, rounds with writes no completed flush covered.
    with_unflushed: u32,
    /// Unflushed writes and their fates, summed.
    writes: u64,
    undone: u64,
    kept: u64,
    torn: u64,
}

impl CutTotals {
    /// Counts one round's power cut.
    pub(crate) fn add(&mut self, r: &powerloss::RecoveryReport) {
        self.rounds += 1;
        self.with_unflushed += u32::from(r.writes > 0);
        self.writes += r.writes;
        self.undone += r.undone;
        self.kept += r.kept;
        self.torn += r.torn;
    }

    /// The totals as the summary prints them.
    fn line(&self) -> String {
        format!(
            "{} of {} rounds had unflushed writes; {} writes: {} undone, {} kept, {} torn",
            self.with_unflushed, self.rounds, self.writes, self.undone, self.kept, self.torn
        )
    }
}

/// Totals of a run.
#[derive(Default, Debug)]
pub(crate) struct Summary {
    /// Rounds run, a failed one included.
    pub(crate) rounds: u32,
    /// Rounds the driver killed.
    pub(crate) kills: u32,
    /// Rounds (not `plain`) whose db_stress exited 0 before the kill.
    pub(crate) clean_exits: u32,
    /// Failures; a run stops at its first.
    pub(crate) failures: u32,
    /// Rounds that planned a mid-I/O power cut.
    pub(crate) cuts_planned: u32,
    /// Of those, rounds whose cut fired (the others ended on the timer).
    pub(crate) cuts_fired: u32,
    /// Power cuts after timed kills.
    pub(crate) after_kill: CutTotals,
    /// Power cuts at a device op.
    pub(crate) mid_io: CutTotals,
    /// The last estimate of device ops per round.
    pub(crate) cut_estimate: f64,
    /// Rounds whose db_stress got past opening the database.
    pub(crate) reached_ops: u32,
    /// `plain` rounds that ran all their operations and exited 0.
    pub(crate) completed: u32,
    /// `--faults`: rounds in which db_stress injected at least one fault.
    pub(crate) rounds_with_faults: u32,
    /// `--faults`: injected faults by operation, over all rounds.
    pub(crate) faults: std::collections::BTreeMap<String, u64>,
    /// Operations that returned an error db_stress accepted, from the
    /// statistics of rounds that ran to the end
    /// ([`stat_errors`](crate::stress::stat_errors)).
    pub(crate) accepted_errors: u64,
}

/// Prints the run's totals (those the mode and `--faults` make matter), at
/// its end or at the failure that ended it.
pub(crate) fn print_summary(cfg: &Config, s: &Summary, elapsed: Duration, run: &RunKnobs) {
    let mut t = String::new();
    let _ = writeln!(t, "== crash test summary");
    let _ = writeln!(
        t,
        "mode:                   {}{}",
        cfg.mode.name(),
        if cfg.faults {
            ", db_stress faults on"
        } else {
            ""
        }
    );
    let _ = writeln!(t, "seed:                   {}", cfg.seed);
    let _ = writeln!(
        t,
        "keys, column families:  {}, {}",
        run.max_key, run.column_families
    );
    let _ = writeln!(t, "rounds:                 {}", s.rounds);
    if cfg.mode == Mode::Plain {
        let _ = writeln!(t, "ran to the end:         {}", s.completed);
    } else {
        let _ = writeln!(t, "kills:                  {}", s.kills);
        let _ = writeln!(t, "clean exits:            {}", s.clean_exits);
    }
    let _ = writeln!(t, "verification failures:  {}", s.failures);
    let _ = writeln!(t, "rounds past the open:   {}", s.reached_ops);
    if cfg.mode == Mode::PowerLoss {
        let _ = writeln!(
            t,
            "mid-I/O cuts:           {} planned, {} fired, {} ended on the timer \
             (last estimate {:.0} device ops per round)",
            s.cuts_planned,
            s.cuts_fired,
            s.cuts_planned - s.cuts_fired,
            s.cut_estimate
        );
        let _ = writeln!(t, "power cuts, mid-I/O:    {}", s.mid_io.line());
        let _ = writeln!(t, "power cuts, timed kill: {}", s.after_kill.line());
    }
    if cfg.faults {
        let total: u64 = s.faults.values().sum();
        let ops: Vec<String> = s.faults.iter().map(|(op, n)| format!("{op} {n}")).collect();
        let _ = writeln!(
            t,
            "injected faults:        {total} in {} rounds ({})",
            s.rounds_with_faults,
            ops.join(", ")
        );
    }
    if cfg.mode == Mode::Plain {
        let _ = writeln!(t, "errors db_stress saw:   {}", s.accepted_errors);
    }
    let _ = writeln!(t, "time:                   {:.0} s", elapsed.as_secs_f64());
    print!("{t}");
}
