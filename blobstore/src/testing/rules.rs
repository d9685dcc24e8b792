//! The rules of a [`FaultDevice`](super::FaultDevice): which operations a
//! rule looks at ([`Kinds`]), when it fires ([`When`]) and what it does
//! then ([`Effect`]).
//!
//! Invariants:
//! - A rule counts only the operations its kinds select, from the moment it
//!   is armed, each operation once; rules count independently of each
//!   other, so two rules may fire on one operation.
//! - A [`When::Nth`] rule fires exactly once, at its n-th operation, and is
//!   then dropped; a [`When::After`] rule fires on every selected operation
//!   past its first n until it is cleared.
//! - Counting is deterministic: the same operations in the same order fire
//!   the same rules.

use std::ops::BitOr;
use std::time::Duration;

use crate::device::IoKind;

/// A set of operation kinds a [`Rule`] looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Kinds(u8);

impl Kinds {
    /// No operation.
    pub const NONE: Kinds = Kinds(0);
    /// Reads.
    pub const READ: Kinds = Kinds(1);
    /// Writes.
    pub const WRITE: Kinds = Kinds(1 << 1);
    /// Flushes.
    pub const FLUSH: Kinds = Kinds(1 << 2);
    /// Unmaps (deallocations).
    pub const UNMAP: Kinds = Kinds(1 << 3);
    /// Write-zeroes.
    pub const WRITE_ZEROES: Kinds = Kinds(1 << 4);
    /// Every kind.
    pub const ALL: Kinds = Kinds(0b1_1111);

    /// The set holding `kind` alone.
    pub const fn of(kind: IoKind) -> Kinds {
        match kind {
            IoKind::Read => Kinds::READ,
            IoKind::Write => Kinds::WRITE,
            IoKind::Flush => Kinds::FLUSH,
            IoKind::Unmap => Kinds::UNMAP,
            IoKind::WriteZeroes => Kinds::WRITE_ZEROES,
        }
    }

    /// Both sets.
    pub const fn union(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
    }

    /// True if `kind` is in the set.
    pub const fn contains(self, kind: IoKind) -> bool {
        self.0 & Kinds::of(kind).0 != 0
    }
}

impl From<IoKind> for Kinds {
    fn from(kind: IoKind) -> Kinds {
        Kinds::of(kind)
    }
}

impl BitOr for Kinds {
    type Output = Kinds;
    fn bitor(self, other: Kinds) -> Kinds {
        self.union(other)
    }
}

/// When a [`Rule`] fires, counting the operations its kinds select from
/// the moment it is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// At the n-th such operation (1: the next one), once.
    Nth(u64),
    /// At every such operation after the first n (0: every one), until the
    /// rule is cleared.
    After(u64),
}

/// What a [`Rule`] does to an operation it fires on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The operation fails with an injected I/O error and does nothing at
    /// all: a failed write reaches neither the device nor the media.
    Fail,
    /// The device loses power just before the operation: it and every
    /// later one fail, and nothing more becomes durable.
    Crash,
    /// The operation goes through, and its completion is reported no
    /// sooner than this long after its submission (a disk retrying a bad
    /// sector).
    Stall(Duration),
}

/// One rule: which operations, when, and what happens to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The operations the rule counts.
    pub kinds: Kinds,
    /// When it fires.
    pub when: When,
    /// What it does.
    pub effect: Effect,
}

impl Rule {
    /// Fails the `n`-th next operation of `kinds` (1: the next; 0 counts
    /// as 1), once.
    pub fn fail_nth(kinds: impl Into<Kinds>, n: u64) -> Rule {
        Rule {
            kinds: kinds.into(),
            when: When::Nth(n.max(1)),
            effect: Effect::Fail,
        }
    }

    /// Lets `n` more operations of `kinds` through, then fails every later
    /// one until cleared (a dying disk).
    pub fn fail_after(kinds: impl Into<Kinds>, n: u64) -> Rule {
        Rule {
            kinds: kinds.into(),
            when: When::After(n),
            effect: Effect::Fail,
        }
    }

    /// Loses power when the `n`-th next operation of any kind is submitted
    /// (1: the next; 0 counts as 1).
    pub fn crash_at(n: u64) -> Rule {
        Rule {
            kinds: Kinds::ALL,
            when: When::Nth(n.max(1)),
            effect: Effect::Crash,
        }
    }

    /// Stalls every operation of `kinds` submitted from now on by `stall`.
    pub fn stall(kinds: impl Into<Kinds>, stall: Duration) -> Rule {
        Rule {
            kinds: kinds.into(),
            when: When::After(0),
            effect: Effect::Stall(stall),
        }
    }

    /// True when this rule, having seen `seen` selected operations (the
    /// current one included), fires on the current one.
    fn fires(&self, seen: u64) -> bool {
        match self.when {
            When::Nth(n) => seen == n,
            When::After(n) => seen > n,
        }
    }

    /// True once the rule can fire no more.
    fn spent(&self, seen: u64) -> bool {
        matches!(self.when, When::Nth(n) if seen >= n)
    }
}

/// What the rules say about one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// A crash rule fired.
    pub crash: bool,
    /// A failure rule fired.
    pub fail: bool,
    /// The longest stall of the stall rules that fired (zero: none).
    pub stall: Duration,
}

/// An armed rule and the selected operations it has seen.
#[derive(Clone, Copy, Debug)]
struct Armed {
    rule: Rule,
    seen: u64,
}

/// The armed rules of one device.
#[derive(Debug, Default)]
pub(crate) struct RuleSet {
    armed: Vec<Armed>,
}

impl RuleSet {
    /// Arms `rule`.
    pub fn arm(&mut self, rule: Rule) {
        self.armed.push(Armed { rule, seen: 0 });
    }

    /// Drops the armed rules whose effect `which` selects.
    pub fn clear(&mut self, which: impl Fn(&Effect) -> bool) {
        self.armed.retain(|a| !which(&a.rule.effect));
    }

    /// Counts an operation of `kind` against the armed rules of one phase:
    /// the crash rules (`crash_phase`, judged first, on every operation) or
    /// the others (judged only while the device has power); returns what
    /// fired and drops the rules that are spent.
    pub fn judge(&mut self, kind: IoKind, crash_phase: bool) -> Verdict {
        let mut v = Verdict::default();
        for a in self.armed.iter_mut().filter(|a| {
            a.rule.kinds.contains(kind) && (a.rule.effect == Effect::Crash) == crash_phase
        }) {
            a.seen += 1;
            if a.rule.fires(a.seen) {
                match a.rule.effect {
                    Effect::Crash => v.crash = true,
                    Effect::Fail => v.fail = true,
                    Effect::Stall(d) => v.stall = v.stall.max(d),
                }
            }
        }
        self.armed.retain(|a| !a.rule.spent(a.seen));
        debug_assert!(self.armed.iter().all(|a| !a.rule.spent(a.seen)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_select_what_they_name() {
        let w = Kinds::WRITE | Kinds::FLUSH;
        assert!(w.contains(IoKind::Write) && w.contains(IoKind::Flush));
        assert!(!w.contains(IoKind::Read) && !w.contains(IoKind::Unmap));
        for k in [
            IoKind::Read,
            IoKind::Write,
            IoKind::Flush,
            IoKind::Unmap,
            IoKind::WriteZeroes,
        ] {
            assert!(Kinds::ALL.contains(k) && !Kinds::NONE.contains(k));
            assert_eq!(Kinds::from(k), Kinds::of(k));
        }
    }

    #[test]
    fn nth_fires_once_and_after_fires_until_cleared() {
        let mut rules = RuleSet::default();
        rules.arm(Rule::fail_nth(IoKind::Read, 2));
        rules.arm(Rule::fail_after(Kinds::WRITE | Kinds::FLUSH, 1));
        let fails = |r: &mut RuleSet, k| r.judge(k, false).fail;
        assert!(!fails(&mut rules, IoKind::Read));
        assert!(!fails(&mut rules, IoKind::Write));
        assert!(fails(&mut rules, IoKind::Read));
        assert!(!fails(&mut rules, IoKind::Read));
        assert!(fails(&mut rules, IoKind::Flush));
        assert!(fails(&mut rules, IoKind::Write));
        assert!(!fails(&mut rules, IoKind::Unmap));
        rules.clear(|e| *e == Effect::Fail);
        assert!(!fails(&mut rules, IoKind::Write));
    }

    #[test]
    fn crash_rules_count_in_their_own_phase() {
        let mut rules = RuleSet::default();
        rules.arm(Rule::crash_at(2));
        rules.arm(Rule::stall(IoKind::Read, Duration::from_millis(5)));
        assert_eq!(rules.judge(IoKind::Read, true), Verdict::default());
        let v = rules.judge(IoKind::Read, false);
        assert_eq!(v.stall, Duration::from_millis(5));
        assert!(!v.crash);
        assert!(rules.judge(IoKind::Write, true).crash);
        // Spent: it never fires again.
        assert!(!rules.judge(IoKind::Write, true).crash);
    }
}
