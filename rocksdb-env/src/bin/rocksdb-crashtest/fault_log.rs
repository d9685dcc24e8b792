//! db_stress's injected-error logs (`--faults`): where they are, their
//! record layout, and [`take_injected_faults`], which counts the faults a
//! db_stress process injected, by operation, and deletes its logs.

use std::path::Path;

/// Where db_stress keeps its injected-error logs when it runs on an
/// `--fs_uri` (`GetFaultInjectionLogBaseDir` in db_stress_test_base.cc).
pub(crate) const FAULT_LOG_DIR: &str = "/tmp/fault_injection_logs";

/// Size of one record of db_stress's injected-error log
/// (`InjectedErrorLog::Entry` in utilities/fault_injection_fs.h).
pub(crate) const FAULT_RECORD_LEN: usize = 256;

/// Where the operation name sits in a record, and its length: after the
/// timestamp, thread id (8 bytes each), the 72-byte detail and four one-byte
/// fields.
pub(crate) const FAULT_RECORD_OP: std::ops::Range<usize> = 92..124;

/// Counts the faults db_stress process `pid` injected, by operation name,
/// from its injected-error logs in `dir`, and deletes those logs. A record
/// with a zero timestamp is a slot never written and is not counted; a
/// tail shorter than a record (a file cut short mid-record) is dropped.
pub(crate) fn take_injected_faults(
    dir: &Path,
    pid: u32,
) -> std::collections::BTreeMap<String, u64> {
    let mut by_op = std::collections::BTreeMap::new();
    let prefix = format!("fault_injection_{pid}_");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return by_op;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || !name.ends_with(".bin") {
            continue;
        }
        if let Ok(bytes) = std::fs::read(e.path()) {
            for rec in bytes.chunks_exact(FAULT_RECORD_LEN) {
                if rec[..8].iter().all(|&b| b == 0) {
                    continue;
                }
                let op = &rec[FAULT_RECORD_OP];
                let end = op.iter().position(|&b| b == 0).unwrap_or(op.len());
                let op = String::from_utf8_lossy(&op[..end]).into_owned();
                *by_op.entry(op).or_insert(0) += 1;
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    by_op
}
