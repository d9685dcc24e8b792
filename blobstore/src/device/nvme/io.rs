//! The per-thread I/O path ([`NvmeBackend`]): one queue pair, fixed
//! trackers indexed by command id, submission, reaping, retries, timeouts
//! and aborts (the module docs of `nvme` describe the design).
//!
//! Invariant: an operation is reported once, and only when the controller
//! no longer owns any of its commands: its memory is never released or
//! reused while the controller may still reach it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cmd::{io_op, sgl_type, Command, Completion};
use super::prp::{Transfer, MAX_TRANSFER_BYTES, PAGE};
use super::queue::QueuePair;
use super::sgl::{SglTransfer, LIST_DESCRIPTORS};

use super::controller::IRQ_WAIT_SLICE_MS;
use super::*;

/// Most completions one reap takes (the rest wait for the next reap).
pub(super) const REAP_MAX: usize = 64;
/// Times a command that failed with a retryable status (DNR clear) is sent
/// again before its error is reported.
pub(super) const MAX_RETRIES: u8 = 3;
/// Reaps between clock reads while commands are outstanding.
const REAPS_PER_CLOCK: u32 = 32;
/// Timeouts are counted in ticks of `io_timeout / TICKS_PER_TIMEOUT`.
const TICKS_PER_TIMEOUT: u64 = 8;
/// No tracker (end of the free list).
const NO_TRACKER: u16 = u16::MAX;

/// What a command carries besides its dwords.
enum CmdData {
    None,
    Prp(Transfer),
    Sgl(SglTransfer),
    /// One deallocate range, written into the command's page.
    Range {
        lba: u64,
        blocks: u32,
    },
}

/// A command of a multi-command (or bounced, or backlogged) operation not
/// yet in the ring.
struct PendingCmd {
    owner: u16,
    tag: Tag,
    cmd: Command,
    data: CmdData,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrackerState {
    Free,
    /// The controller owns the command.
    Active,
    /// Timed out; an Abort was sent for it.
    Aborting,
}

/// One command id of the queue pair: the command the controller holds
/// under it, and (implicitly, page `cid` of `pages`) its PRP list page.
#[derive(Clone, Copy)]
struct Tracker {
    state: TrackerState,
    /// The namespace channel ([`Owner`]) the command's operation is of.
    owner: u16,
    /// The operation (channel tag) the command belongs to.
    tag: Tag,
    /// Times the command was sent again after a retryable status.
    retries: u8,
    /// Tick of the submission (or of the Abort).
    tick: u64,
    /// The command as sent, for retries.
    cmd: Command,
    /// Next free tracker when this one is free.
    next_free: u16,
}

/// What the backend keeps of a channel operation until it reports it.
pub(super) struct OpState {
    live: bool,
    kind: IoKind,
    lba: u64,
    blocks: u64,
    /// Commands not yet completed (pending or outstanding).
    remaining: u32,
    error: Option<Error>,
    /// A command of the op timed out (reported as a timeout).
    timed_out: bool,
    /// The pool buffer standing in for memory that is not DMA-able.
    bounce: Option<DmaBuf>,
    /// Where a bounced read is copied back to.
    segs: Vec<Segment>,
}

impl OpState {
    fn idle() -> OpState {
        OpState {
            live: false,
            kind: IoKind::Flush,
            lba: 0,
            blocks: 0,
            remaining: 0,
            error: None,
            timed_out: false,
            bounce: None,
            segs: Vec::new(),
        }
    }
}

/// One namespace channel served by a thread's queue pair.
pub(super) struct Owner {
    /// A [`NamespaceBackend`] uses this slot.
    pub(super) live: bool,
    nsid: u32,
    block_size: u64,
    /// Indexed by the channel's tag.
    pub(super) ops: Vec<OpState>,
    /// Its ops finished while it was not the one reaping (or failed
    /// outside a reap), reported by its next reap.
    pub(super) ready: Vec<(Tag, Result<()>)>,
}

/// A thread's I/O queue pair on one controller, serving the thread's
/// channels of every namespace of it (each a [`NamespaceBackend`], an
/// [`Owner`] here).
///
/// Invariants:
/// - A tracker is `Free` exactly when it is on the free list; `active`
///   counts the others, and the controller may hold a command only under
///   an `Active` or `Aborting` tracker.
/// - An op is reported once, and only when none of its commands is owned
///   by the controller any more: all completed, or the controller was
///   disabled (fatal status, reset). Only then may its memory (held by the
///   channel, or the bounce buffer held here) be released or reused.
/// - The steady-state path (one command per op, DMA-able memory) allocates
///   nothing, hashes nothing and takes no lock: the command and its PRPs
///   go straight into the ring and the tracker's page, and completions are
///   handed to the channel as they are read.
/// - A completion goes to the channel that reaps when its op is that
///   channel's (`cur`), else to its owner's `ready` list: every op is
///   reported once, by its own channel.
pub(super) struct NvmeBackend {
    pub(super) ctrl: Arc<NvmeController>,
    /// The owner on whose behalf `submit` or `reap` runs now.
    pub(super) cur: u16,
    pub(super) owners: Vec<Owner>,
    /// Entries in all owners' `ready` lists (so a reap looks at its list
    /// only when there is something).
    pub(super) ready_count: usize,
    max_transfer_bytes: u64,
    /// Largest PRP command (one list page).
    prp_max_bytes: u64,
    /// Data in SGLs when PRPs cannot describe it in one command.
    sgl: bool,
    /// SGL data blocks must be dword aligned.
    sgl_dword: bool,
    dsm: bool,
    write_zeroes: bool,
    qp: QueuePair,
    generation: u64,
    /// One page per command id: its PRP list or its deallocate range.
    pages: DmaBuf,
    pages_iova: u64,
    trackers: Box<[Tracker]>,
    free_head: u16,
    /// Trackers not free.
    active: usize,
    /// Trackers aborting.
    aborting: usize,
    /// Commands waiting for a tracker or ring slot, in order.
    pending: VecDeque<PendingCmd>,
    zeroes: Option<DmaBuf>,
    reaps_since_clock: u32,
    /// Timeout ticks seen (see `check_clock`).
    tick: u64,
    tick_started: Option<Instant>,
    /// The eventfd of this queue's completion interrupt (the controller's,
    /// which the `ctrl` Arc keeps open), if it has one.
    irq_fd: Option<std::os::fd::RawFd>,
}

impl NvmeBackend {
    pub(super) fn new(ctrl: Arc<NvmeController>) -> Result<NvmeBackend> {
        if ctrl.state.load(Ordering::Acquire) != state::LIVE {
            return Err(ctrl.failed_error("controller failed or resetting; reset it first"));
        }
        let entries = IO_ENTRIES.min(ctrl.cap.max_queue_entries);
        let qid = ctrl.alloc_qid()?;
        let made = QueuePair::new(&ctrl.pool, &ctrl.cap, qid, entries, ctrl.shadow.as_ref())
            .and_then(|qp| {
                let pages = ctrl.pool.alloc(entries as usize * PAGE as usize)?;
                let generation = ctrl.generation.load(Ordering::Acquire);
                ctrl.create_io_queues(&qp)?;
                Ok((qp, pages, generation))
            });
        let (qp, pages, generation) = match made {
            Ok(m) => m,
            Err(e) => {
                ctrl.free_qid(qid);
                return Err(e);
            }
        };
        // As many trackers as the ring can hold commands.
        let n = (entries - 1) as u16;
        let trackers = (0..n)
            .map(|i| Tracker {
                state: TrackerState::Free,
                owner: 0,
                tag: 0,
                retries: 0,
                tick: 0,
                cmd: Command::default(),
                next_free: if i + 1 < n { i + 1 } else { NO_TRACKER },
            })
            .collect();
        Ok(NvmeBackend {
            cur: 0,
            owners: Vec::new(),
            ready_count: 0,
            max_transfer_bytes: ctrl.max_transfer_bytes,
            prp_max_bytes: ctrl.max_transfer_bytes.min(MAX_TRANSFER_BYTES),
            sgl: ctrl.sgl,
            sgl_dword: ctrl.identity.sgl_needs_dword_alignment(),
            dsm: ctrl.identity.supports_dsm(),
            write_zeroes: ctrl.identity.supports_write_zeroes(),
            qp,
            generation,
            pages_iova: pages.iova().expect("pool memory").0,
            pages,
            trackers,
            free_head: 0,
            active: 0,
            aborting: 0,
            pending: VecDeque::new(),
            zeroes: None,
            reaps_since_clock: 0,
            tick: 0,
            tick_started: None,
            irq_fd: ctrl
                .irq_vector(qid)
                .map(|v| std::os::fd::AsRawFd::as_raw_fd(&ctrl.irqs[v as usize])),
            ctrl,
        })
    }

    fn page_iova(&self, cid: u16) -> u64 {
        self.pages_iova + cid as u64 * PAGE
    }

    fn write_page_u64(&self, cid: u16, index: usize, val: u64) {
        debug_assert!(index < (PAGE / 8) as usize);
        let base = self.pages.as_mut_ptr().cast::<u64>();
        // SAFETY: page `cid` of the per-command pages, entry `index` < 512;
        // the controller reads it only after the doorbell for this command.
        unsafe { std::ptr::write_volatile(base.add(cid as usize * 512 + index), val.to_le()) };
    }

    /// A slot for namespace `nsid` (`block_size` bytes per block); its
    /// index names it in trackers and pending commands.
    pub(super) fn add_owner(&mut self, nsid: u32, block_size: u64) -> u16 {
        let o = Owner {
            live: true,
            nsid,
            block_size,
            ops: Vec::new(),
            ready: Vec::new(),
        };
        match self.owners.iter().position(|o| !o.live) {
            Some(i) => {
                self.owners[i] = o;
                i as u16
            }
            None => {
                self.owners.push(o);
                (self.owners.len() - 1) as u16
            }
        }
    }

    /// True while an op of `owner` has not been reported.
    pub(super) fn owner_busy(&self, owner: u16) -> bool {
        let o = &self.owners[owner as usize];
        o.ops.iter().any(|op| op.live) || !o.ready.is_empty()
    }

    /// Block size of the current owner's namespace.
    #[inline]
    fn block_size(&self) -> u64 {
        self.owners[self.cur as usize].block_size
    }

    fn op_slot(&mut self, tag: Tag) -> &mut OpState {
        let ops = &mut self.owners[self.cur as usize].ops;
        let i = tag as usize;
        if i >= ops.len() {
            ops.resize_with(i + 1, OpState::idle);
        }
        &mut ops[i]
    }

    /// Takes a free tracker for `cmd` of op `tag` and puts the command in
    /// the ring (the doorbell is rung by the next reap). The caller checked
    /// that a tracker is free and the ring has room.
    fn start_command(&mut self, cid: u16, owner: u16, tag: Tag, cmd: Command) {
        debug_assert_eq!(cid, self.free_head);
        let t = &mut self.trackers[cid as usize];
        debug_assert_eq!(t.state, TrackerState::Free);
        self.free_head = t.next_free;
        *t = Tracker {
            state: TrackerState::Active,
            owner,
            tag,
            retries: 0,
            tick: self.tick,
            cmd,
            next_free: NO_TRACKER,
        };
        self.active += 1;
        let pushed = self.qp.push(&cmd, cid);
        debug_assert!(pushed, "caller checked the ring");
    }

    fn free_tracker(&mut self, cid: u16) {
        let t = &mut self.trackers[cid as usize];
        debug_assert_ne!(t.state, TrackerState::Free);
        if t.state == TrackerState::Aborting {
            self.aborting -= 1;
        }
        t.state = TrackerState::Free;
        t.next_free = self.free_head;
        self.free_head = cid;
        self.active -= 1;
    }

    /// Writes the PRPs of `segs` (whole blocks of `bs` bytes) for command
    /// `cid` (its list into the tracker's page) when they fit one command;
    /// returns (PRP1, PRP2, bytes), or `None` when the op needs the general
    /// planner.
    #[inline]
    fn direct_prps(&self, cid: u16, segs: &[Segment], bs: u64) -> Option<(u64, u64, u64)> {
        let (mut n, mut prp1, mut second, mut total, mut last_end) = (0usize, 0, 0, 0u64, 0);
        for s in segs {
            let start = s.iova()?.0;
            let len = s.len() as u64;
            let joins = if n == 0 {
                start % 4 == 0
            } else {
                last_end % PAGE == 0 && start % PAGE == 0
            };
            total += len;
            if !joins || total > self.max_transfer_bytes {
                return None;
            }
            let end = start + len;
            let mut addr = start;
            while addr < end {
                match n {
                    0 => prp1 = addr,
                    _ if n > prp::LIST_ENTRIES => return None,
                    _ => {
                        if n == 1 {
                            second = addr;
                        }
                        self.write_page_u64(cid, n - 1, addr);
                    }
                }
                n += 1;
                addr = (addr / PAGE + 1) * PAGE;
            }
            last_end = end;
        }
        if n == 0 || !total.is_multiple_of(bs) {
            return None;
        }
        let prp2 = match n {
            1 => 0,
            2 => second,
            _ => self.page_iova(cid),
        };
        Some((prp1, prp2, total))
    }

    /// Writes the SGL of `segs` (whole blocks of `bs` bytes) for command
    /// `cid` (its descriptors into the tracker's page when there are
    /// several) when they fit one command; returns the command's descriptor
    /// (address, length, type) and the bytes, or `None` when the op needs
    /// the general planner.
    fn direct_sgl(&self, cid: u16, segs: &[Segment], bs: u64) -> Option<(u64, u32, u8, u64)> {
        if segs.is_empty() || segs.len() > LIST_DESCRIPTORS {
            return None;
        }
        let mut total = 0u64;
        for (i, s) in segs.iter().enumerate() {
            let (addr, len) = (s.iova()?.0, s.len() as u64);
            if len == 0 || len > self.max_transfer_bytes {
                return None;
            }
            if self.sgl_dword && !(addr.is_multiple_of(4) && len.is_multiple_of(4)) {
                return None;
            }
            total += len;
            if segs.len() > 1 {
                self.write_page_u64(cid, 2 * i, addr);
                let high = cmd::sgl_descriptor_high(len as u32, sgl_type::DATA_BLOCK);
                self.write_page_u64(cid, 2 * i + 1, high);
            }
        }
        if total > self.max_transfer_bytes || !total.is_multiple_of(bs) {
            return None;
        }
        if segs.len() == 1 {
            let addr = segs[0].iova()?.0;
            return Some((addr, total as u32, sgl_type::DATA_BLOCK, total));
        }
        let list_bytes = (segs.len() * cmd::SGL_DESCRIPTOR_BYTES) as u32;
        Some((
            self.page_iova(cid),
            list_bytes,
            sgl_type::LAST_SEGMENT,
            total,
        ))
    }

    /// The commands for `pieces` of pool memory: SGLs when the controller
    /// takes them, else PRPs; `None` when they cannot be described.
    /// Each as (first block relative to the op, blocks, data pointer).
    fn plan_transfers(
        &self,
        pieces: &[(crate::device::Iova, u64)],
    ) -> Option<Vec<(u64, u32, CmdData)>> {
        let bs = self.block_size();
        if self.sgl {
            let plan = sgl::plan(pieces, bs, self.max_transfer_bytes, self.sgl_dword)?;
            return Some(
                plan.into_iter()
                    .map(|t| (t.first_block, t.blocks, CmdData::Sgl(t)))
                    .collect(),
            );
        }
        let plan = prp::plan(pieces, bs, self.prp_max_bytes)?;
        Some(
            plan.into_iter()
                .map(|t| (t.first_block, t.blocks, CmdData::Prp(t)))
                .collect(),
        )
    }

    /// The steady-state path: a read or write that fits one command goes
    /// straight into the ring. False when it does not (nothing changed).
    #[inline]
    fn submit_direct(&mut self, tag: Tag, op: &IoOp) -> bool {
        let cid = self.free_head;
        if cid == NO_TRACKER || self.qp.sq_full() || !self.pending.is_empty() {
            return false;
        }
        let opcode = if op.kind == IoKind::Read {
            io_op::READ
        } else {
            io_op::WRITE
        };
        let (nsid, bs) = {
            let o = &self.owners[self.cur as usize];
            (o.nsid, o.block_size)
        };
        let mut cmd;
        if let Some((prp1, prp2, bytes)) = self.direct_prps(cid, &op.segs, bs) {
            cmd = Command::rw(opcode, nsid, op.lba.get(), (bytes / bs) as u32);
            cmd.prp1 = prp1;
            cmd.prp2 = prp2;
        } else if self.sgl {
            let Some((addr, len, kind, bytes)) = self.direct_sgl(cid, &op.segs, bs) else {
                return false;
            };
            cmd = Command::rw(opcode, nsid, op.lba.get(), (bytes / bs) as u32);
            cmd.set_sgl(addr, len, kind);
        } else {
            return false;
        }
        let o = self.op_slot(tag);
        debug_assert!(!o.live, "tag {tag} reused while live");
        o.live = true;
        o.kind = op.kind;
        o.lba = op.lba.get();
        o.blocks = op.blocks;
        o.remaining = 1;
        o.error = None;
        o.timed_out = false;
        self.start_command(cid, self.cur, tag, cmd);
        true
    }

    /// The general path: builds the commands of `op` (into `pending`) and
    /// its state.
    fn plan(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let (owner, nsid) = (self.cur, self.owners[self.cur as usize].nsid);
        let bs = self.block_size();
        let mut cmds: Vec<(Command, CmdData)> = Vec::new();
        let mut bounce = None;
        let mut copy_back = Vec::new();
        match op.kind {
            IoKind::Read | IoKind::Write => {
                let opcode = if op.kind == IoKind::Read {
                    io_op::READ
                } else {
                    io_op::WRITE
                };
                let pieces: Option<Vec<_>> = op
                    .segs
                    .iter()
                    .map(|s| s.iova().map(|i| (i, s.len() as u64)))
                    .collect();
                let plan = pieces.and_then(|p| self.plan_transfers(&p));
                let plan = match plan {
                    Some(p) => p,
                    None => {
                        // Not pool memory (or not describable): one copy.
                        // The copy (write) or the device (read) fills it.
                        let total: usize = op.segs.iter().map(|s| s.len()).sum();
                        let b = self.ctrl.pool.alloc_for_overwrite(total)?;
                        if op.kind == IoKind::Write {
                            let mut at = 0;
                            for s in &op.segs {
                                // SAFETY: the segment belongs to this op; the
                                // bounce buffer is ours and not yet handed on.
                                unsafe {
                                    s.read_at(
                                        0,
                                        std::slice::from_raw_parts_mut(
                                            b.as_mut_ptr().add(at),
                                            s.len(),
                                        ),
                                    )
                                };
                                at += s.len();
                            }
                        } else {
                            copy_back = op.segs.iter().map(|s| s.clone_ref()).collect();
                        }
                        let iova = b.iova().expect("pool memory");
                        let p = self
                            .plan_transfers(&[(iova, total as u64)])
                            .expect("one pool buffer always plans");
                        bounce = Some(b);
                        p
                    }
                };
                for (first_block, blocks, data) in plan {
                    let cmd = Command::rw(opcode, nsid, op.lba.get() + first_block, blocks);
                    cmds.push((cmd, data));
                }
            }
            IoKind::Flush => cmds.push((Command::flush(nsid), CmdData::None)),
            IoKind::Unmap => {
                if !self.dsm {
                    return Err(Error::Unsupported(format!(
                        "{}: the controller has no Dataset Management (unmap)",
                        self.ctrl.name
                    )));
                }
                let mut at = 0;
                while at < op.blocks {
                    let n = (op.blocks - at).min(u32::MAX as u64) as u32;
                    let cmd = Command::deallocate(nsid, crate::device::Iova(0), 1);
                    cmds.push((
                        cmd,
                        CmdData::Range {
                            lba: op.lba.get() + at,
                            blocks: n,
                        },
                    ));
                    at += n as u64;
                }
            }
            IoKind::WriteZeroes => {
                let mut at = 0;
                if self.write_zeroes {
                    while at < op.blocks {
                        let n = (op.blocks - at).min(65536) as u32;
                        let cmd = Command::rw(io_op::WRITE_ZEROES, nsid, op.lba.get() + at, n);
                        cmds.push((cmd, CmdData::None));
                        at += n as u64;
                    }
                } else {
                    // Emulated: writes from one zeroed buffer.
                    let max = self.prp_max_bytes;
                    if self.zeroes.is_none() {
                        self.zeroes = Some(self.ctrl.pool.alloc(max as usize)?);
                    }
                    let iova = self.zeroes.as_ref().and_then(|z| z.iova()).expect("pool");
                    while at < op.blocks {
                        let n = (op.blocks - at).min(max / bs);
                        let t = prp::plan(&[(iova, n * bs)], bs, max)
                            .expect("one pool buffer always plans")
                            .remove(0);
                        let cmd = Command::rw(io_op::WRITE, nsid, op.lba.get() + at, n as u32);
                        cmds.push((cmd, CmdData::Prp(t)));
                        at += n;
                    }
                }
            }
        }
        let o = self.op_slot(tag);
        debug_assert!(!o.live, "tag {tag} reused while live");
        *o = OpState {
            live: true,
            kind: op.kind,
            lba: op.lba.get(),
            blocks: op.blocks,
            remaining: cmds.len() as u32,
            error: None,
            timed_out: false,
            bounce,
            segs: copy_back,
        };
        for (cmd, data) in cmds {
            self.pending.push_back(PendingCmd {
                owner,
                tag,
                cmd,
                data,
            });
        }
        Ok(())
    }

    /// Moves pending commands into the ring while trackers and slots last.
    fn push_pending(&mut self) {
        while self.free_head != NO_TRACKER && !self.qp.sq_full() {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let Some(op) = self.owners[p.owner as usize].ops.get_mut(p.tag as usize) else {
                continue;
            };
            if !op.live {
                continue;
            }
            if op.error.is_some() || op.timed_out {
                // The operation already failed: do not send the rest.
                op.remaining -= 1;
                if op.remaining == 0 {
                    let r = self.finish(p.owner, p.tag);
                    self.push_ready(p.owner, p.tag, r);
                }
                continue;
            }
            // The command's page is its tracker's.
            let mut cmd = p.cmd;
            let cid = self.free_head;
            match &p.data {
                CmdData::None => {}
                CmdData::Prp(t) => {
                    let list = crate::device::Iova(self.page_iova(cid));
                    let (p1, p2) = t.prps(list, |i, a| self.write_page_u64(cid, i, a));
                    cmd.prp1 = p1;
                    cmd.prp2 = p2;
                }
                CmdData::Sgl(t) => match t.descriptors[..] {
                    [(addr, len)] => cmd.set_sgl(addr, len, sgl_type::DATA_BLOCK),
                    ref ds => {
                        for (i, &(addr, len)) in ds.iter().enumerate() {
                            self.write_page_u64(cid, 2 * i, addr);
                            let high = cmd::sgl_descriptor_high(len, sgl_type::DATA_BLOCK);
                            self.write_page_u64(cid, 2 * i + 1, high);
                        }
                        let list_bytes = (ds.len() * cmd::SGL_DESCRIPTOR_BYTES) as u32;
                        cmd.set_sgl(self.page_iova(cid), list_bytes, sgl_type::LAST_SEGMENT);
                    }
                },
                CmdData::Range { lba, blocks } => {
                    // Context attributes 0, length, starting LBA.
                    self.write_page_u64(cid, 0, (*blocks as u64) << 32);
                    self.write_page_u64(cid, 1, *lba);
                    cmd.prp1 = self.page_iova(cid);
                }
            }
            self.start_command(cid, p.owner, p.tag, cmd);
        }
    }

    /// The op's result; marks it reported. Copies a bounced read back.
    #[inline]
    fn finish(&mut self, owner: u16, tag: Tag) -> Result<()> {
        let op = &mut self.owners[owner as usize].ops[tag as usize];
        debug_assert!(op.live);
        op.live = false;
        if !op.timed_out && op.error.is_none() && op.bounce.is_none() {
            return Ok(());
        }
        self.finish_slow(owner, tag)
    }

    #[cold]
    fn finish_slow(&mut self, owner: u16, tag: Tag) -> Result<()> {
        let after_ms = self.ctrl.io_timeout().as_millis() as u64;
        let op = &mut self.owners[owner as usize].ops[tag as usize];
        let bounce = op.bounce.take();
        let segs = std::mem::take(&mut op.segs);
        if op.timed_out {
            op.error = None;
            return Err(Error::Timeout {
                op: op.kind.name(),
                lba: op.lba,
                blocks: op.blocks,
                after_ms,
            });
        }
        if let Some(e) = op.error.take() {
            return Err(e);
        }
        if let Some(b) = &bounce {
            let mut at = 0;
            for s in &segs {
                // SAFETY: the read completed, so the controller is done with
                // the bounce buffer; the segment belongs to this op.
                unsafe { s.write_at(0, std::slice::from_raw_parts(b.as_ptr().add(at), s.len())) };
                at += s.len();
            }
        }
        Ok(())
    }

    /// One completion of the I/O queue: 1 when it finished an op (handed to
    /// `done`), else 0.
    #[inline]
    fn complete(&mut self, c: Completion, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let cid = c.cid;
        let known = self
            .trackers
            .get(cid as usize)
            .is_some_and(|t| t.state != TrackerState::Free);
        if !known || c.sq_id != self.qp.qid {
            self.ctrl.stray_completion(self.qp.qid, &c);
            return 0;
        }
        let t = &mut self.trackers[cid as usize];
        let (owner, tag) = (t.owner, t.tag);
        let aborting = t.state == TrackerState::Aborting;
        if let Err(status) = c.status() {
            if !aborting && !c.dnr && t.retries < MAX_RETRIES && !self.qp.sq_full() {
                // Retryable: the same command again, under the same id.
                t.retries += 1;
                t.tick = self.tick;
                let cmd = t.cmd;
                self.qp.push(&cmd, cid);
                self.ctrl.counters.retries.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            let o = &mut self.owners[owner as usize];
            let (nsid, op) = (o.nsid, &mut o.ops[tag as usize]);
            if !aborting {
                op.error.get_or_insert(Error::Nvme {
                    op: op.kind.name(),
                    nsid,
                    lba: op.lba,
                    blocks: op.blocks,
                    status,
                });
            }
        }
        self.free_tracker(cid);
        let op = &mut self.owners[owner as usize].ops[tag as usize];
        op.remaining -= 1;
        if op.remaining > 0 {
            return 0;
        }
        let r = self.finish(owner, tag);
        if owner == self.cur {
            done(tag, r);
            return 1;
        }
        // Another namespace's channel on this queue reports it.
        self.push_ready(owner, tag, r);
        0
    }

    /// Fails every op the backend holds (reported by the next reap). Only
    /// called once the controller no longer owns any of their commands.
    fn fail_all(&mut self, reason: &str) {
        for cid in 0..self.trackers.len() {
            let t = self.trackers[cid];
            if t.state != TrackerState::Free {
                if t.state == TrackerState::Aborting {
                    self.owners[t.owner as usize].ops[t.tag as usize].timed_out = true;
                }
                self.free_tracker(cid as u16);
            }
        }
        debug_assert_eq!((self.active, self.aborting), (0, 0));
        self.pending.clear();
        for owner in 0..self.owners.len() {
            for tag in 0..self.owners[owner].ops.len() {
                let op = &mut self.owners[owner].ops[tag];
                if !op.live {
                    continue;
                }
                op.error.get_or_insert_with(|| Error::DeviceFailed {
                    device: self.ctrl.name.clone(),
                    reason: reason.to_string(),
                });
                let r = self.finish(owner as u16, tag as Tag);
                self.push_ready(owner as u16, tag as Tag, r);
            }
        }
    }

    /// Follows the controller's state: fails everything once a reset or a
    /// fatal status has stopped the controller, and creates the queue pair
    /// again after a reset. Ok when the queue pair can be used.
    #[inline]
    fn check_controller(&mut self) -> Result<()> {
        let st = self.ctrl.state.load(Ordering::Acquire);
        let gen = self.ctrl.generation.load(Ordering::Acquire);
        if st == state::LIVE && gen == self.generation {
            return Ok(());
        }
        self.controller_changed(st, gen)
    }

    #[cold]
    fn controller_changed(&mut self, st: u8, gen: u64) -> Result<()> {
        match st {
            state::RESETTING => {
                // The controller may still be using our memory: fail nothing
                // until it is disabled and the reset is done.
                Err(self.ctrl.failed_error("controller reset in progress"))
            }
            state::WEDGED => Err(self.ctrl.failed_error(
                "controller failed and did not stop: its in-flight commands keep their memory",
            )),
            state::FAILED => {
                self.fail_all("controller fatal status: the controller was disabled; reset it");
                Err(self.ctrl.failed_error("controller failed; reset it"))
            }
            _ => {
                self.fail_all("controller reset while the operation was in flight");
                self.qp.reset();
                self.ctrl.create_io_queues(&self.qp)?;
                self.generation = gen;
                Ok(())
            }
        }
    }

    /// Reads the clock now and then; on each timeout tick checks for a
    /// fatal status, aborts commands past their timeout without waiting,
    /// and resets the controller when an aborted command has not finished
    /// one more timeout later.
    #[cold]
    fn check_clock(&mut self) {
        let now = Instant::now();
        let timeout = self.ctrl.io_timeout();
        let tick_len = (timeout / TICKS_PER_TIMEOUT as u32).max(Duration::from_micros(100));
        // Each tick is at least `tick_len` long (the first after an idle
        // spell may be shorter), so a command is past its timeout once
        // TICKS_PER_TIMEOUT + 1 ticks passed since its own.
        match self.tick_started {
            Some(t0) if now.duration_since(t0) < tick_len => return,
            _ => {}
        }
        self.tick += 1;
        self.tick_started = Some(now);
        if self.ctrl.fatal_status() {
            self.ctrl.disable_after_fatal();
            return;
        }
        // Abort completions and asynchronous events.
        self.ctrl.poll_admin();
        // Ticks a timeout lasts: TICKS_PER_TIMEOUT, or fewer when the tick's
        // floor makes each tick longer than timeout / TICKS_PER_TIMEOUT (a
        // zero timeout: none, so the first tick after a command's own finds
        // it late, as "a deadline no command can meet" asks).
        let ticks =
            (timeout.as_nanos().div_ceil(tick_len.as_nanos()) as u64).min(TICKS_PER_TIMEOUT);
        let limit = ticks + 1;
        let mut reset = false;
        for cid in 0..self.trackers.len() {
            let t = self.trackers[cid];
            if self.tick - t.tick < limit {
                continue;
            }
            match t.state {
                TrackerState::Active => {
                    // Past its deadline: a timeout, however it ends.
                    self.owners[t.owner as usize].ops[t.tag as usize].timed_out = true;
                    let abort = Command::abort(self.qp.qid, cid as u16);
                    if self.ctrl.admin_detached(abort) {
                        self.ctrl.counters.aborts.fetch_add(1, Ordering::Relaxed);
                        let t = &mut self.trackers[cid];
                        t.state = TrackerState::Aborting;
                        t.tick = self.tick;
                        self.aborting += 1;
                    } else if self.tick - t.tick >= 2 * limit {
                        // No Abort could be sent for a whole timeout.
                        reset = true;
                    }
                }
                TrackerState::Aborting => reset = true,
                TrackerState::Free => {}
            }
        }
        if reset {
            eprintln!(
                "nvme {}: an aborted command of queue {} did not finish: resetting the controller",
                self.ctrl.name, self.qp.qid
            );
            if let Err(e) = self.ctrl.reset() {
                eprintln!("nvme {}: reset failed: {e}", self.ctrl.name);
            }
        }
    }
}

impl NvmeBackend {
    /// Starts `op` of the current owner (`cur`).
    #[inline]
    pub(super) fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        self.check_controller()?;
        if matches!(op.kind, IoKind::Read | IoKind::Write) && self.submit_direct(tag, op) {
            return Ok(());
        }
        self.plan(tag, op)?;
        self.push_pending();
        Ok(())
    }

    /// Reaps the queue for the current owner (`cur`): its ops go to
    /// `done`, other owners' to their `ready` lists.
    pub(super) fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let usable = self.check_controller().is_ok();
        let mut n = self.drain_ready(done);
        if !usable {
            return n;
        }
        // Submissions since the last reap: one doorbell write for all.
        self.qp.ring(&*self.ctrl.bar);
        let mut taken = 0;
        while taken < REAP_MAX {
            let Some(c) = self.qp.next_completion() else {
                break;
            };
            taken += 1;
            n += self.complete(c, done);
        }
        self.qp.release_completions(&*self.ctrl.bar);
        if !self.pending.is_empty() {
            self.push_pending();
        }
        if self.active > 0 {
            self.reaps_since_clock += 1;
            if self.reaps_since_clock >= REAPS_PER_CLOCK {
                self.reaps_since_clock = 0;
                self.check_clock();
                let _ = self.check_controller();
            }
        }
        // Retries and backlog pushed above.
        if self.qp.unrung() && self.check_controller().is_ok() {
            self.qp.ring(&*self.ctrl.bar);
        }
        n + self.drain_ready(done)
    }

    /// Sleeps on the queue's completion interrupt until an op of the
    /// current owner has finished (it then waits in the owner's ready list
    /// for the next reap), or at most `IRQ_WAIT_SLICE_MS`; false without
    /// interrupts (the caller polls). Completions that only finish a part
    /// of an op (a multi-command transfer) are taken here and the thread
    /// sleeps again, instead of waking its caller for each. Interrupts
    /// counted before the queue was last looked at are drained first, so
    /// a sleep ends only for a completion posted after the look (or a
    /// shared vector's).
    pub(super) fn wait(&mut self) -> bool {
        let Some(fd) = self.irq_fd else {
            return false;
        };
        if !self.ctrl.irq_waits.load(Ordering::Relaxed) {
            return false;
        }
        loop {
            if self.active == 0 || self.check_controller().is_err() {
                return true;
            }
            let cur = self.cur as usize;
            let mut mine = std::mem::take(&mut self.owners[cur].ready);
            let had = mine.len();
            // Rings what was submitted, takes what completed: the current
            // owner's finished ops go to `mine`, others' to their lists.
            self.reap(&mut |t, r| mine.push((t, r)));
            let finished = mine.len() - had;
            self.ready_count += finished;
            self.owners[cur].ready = mine;
            if finished > 0 || !self.owners[cur].ready.is_empty() {
                return true;
            }
            let mut count = 0u64;
            // SAFETY: a non-blocking eventfd the controller keeps open;
            // reads 8 bytes into `count`. EAGAIN (nothing counted) is fine.
            unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
            if self.qp.completion_posted() {
                continue;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            self.ctrl.irq_sleeps.fetch_add(1, Ordering::Relaxed);
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, IRQ_WAIT_SLICE_MS) } <= 0 {
                // The slice ran out (or a signal): let the caller poll.
                return true;
            }
        }
    }

    /// Leaves a finished op for its owner's next reap.
    fn push_ready(&mut self, owner: u16, tag: Tag, r: Result<()>) {
        self.owners[owner as usize].ready.push((tag, r));
        self.ready_count += 1;
    }

    /// Reports the current owner's ops that finished elsewhere.
    #[inline]
    fn drain_ready(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        if self.ready_count == 0 {
            return 0;
        }
        let ready = &mut self.owners[self.cur as usize].ready;
        let mut n = 0;
        while let Some((t, r)) = ready.pop() {
            done(t, r);
            n += 1;
        }
        self.ready_count -= n;
        n
    }
}

impl Drop for NvmeBackend {
    fn drop(&mut self) {
        if self.ctrl.state.load(Ordering::Acquire) == state::LIVE
            && self.ctrl.generation.load(Ordering::Acquire) == self.generation
        {
            self.ctrl.delete_io_queues(self.qp.qid);
        }
        self.ctrl.free_qid(self.qp.qid);
    }
}
