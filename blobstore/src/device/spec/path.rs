//! The `%XX` escaping of paths in `file:` and `shm:` specs: `%`, `?` and
//! control characters are escaped, and so is each non-ASCII byte of a path
//! that is not UTF-8.
//!
//! Invariant: [`decode_path`] gives back the path [`encode_path`] was
//! given, byte for byte (UTF-8 or not).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Path text with `%`, `?` and control characters as `%XX`; a path that is
/// not UTF-8 has each of its non-ASCII bytes escaped too.
pub(super) fn encode_path(path: &std::path::Path) -> String {
    let escape = |b: u8| b == b'%' || b == b'?' || b.is_ascii_control();
    let mut out = String::new();
    match path.to_str() {
        Some(text) => {
            for c in text.chars() {
                if c.is_ascii() && escape(c as u8) {
                    out.push_str(&format!("%{:02X}", c as u32));
                } else {
                    out.push(c);
                }
            }
        }
        None => {
            for &b in path.as_os_str().as_bytes() {
                if escape(b) || !b.is_ascii() {
                    out.push_str(&format!("%{b:02X}"));
                } else {
                    out.push(b as char);
                }
            }
        }
    }
    out
}

/// The path that `s` (as [`encode_path`] writes it) names; an error for a
/// `%` without two hex digits after it.
pub(super) fn decode_path(s: &str) -> std::result::Result<PathBuf, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let b = hex
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("bad escape at byte {i} of the path: '%' must be followed by two hex digits (write a literal '%' as %25)")
                })?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(PathBuf::from(OsString::from_vec(out)))
}
