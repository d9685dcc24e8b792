//! File names: a flat namespace of `/`-separated paths.
//!
//! Rules (documented in the README): a name is UTF-8, at most
//! [`MAX_NAME_LEN`] bytes, made of components of 1 to [`MAX_COMPONENT_LEN`]
//! bytes separated by single `/`; no NUL, no `.` or `..` components. A
//! leading `/` is accepted and dropped, as is a trailing one, so `/db/CURRENT`
//! and `db/CURRENT` name the same file. The root directory is the empty name.

use crate::error::{Error, Result};

/// Longest full name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest component, in bytes.
pub const MAX_COMPONENT_LEN: usize = 255;

/// Checks a name and returns its normal form.
pub fn normalize(name: &str) -> Result<String> {
    normalized(name).map(str::to_string)
}

/// True when `name` is a valid entry name in its normal form (not the
/// root), checked without copying it (a mount checks every name).
pub fn is_normal_entry(name: &str) -> bool {
    normalized(name).is_ok_and(|n| !n.is_empty() && n.len() == name.len())
}

/// Checks a name and returns its normal form, a slice of it.
fn normalized(name: &str) -> Result<&str> {
    let bad = |reason: &str| {
        Err(Error::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    let trimmed = name.trim_start_matches('/').trim_end_matches('/');
    if trimmed.len() > MAX_NAME_LEN {
        return bad(&format!("longer than {MAX_NAME_LEN} bytes"));
    }
    if trimmed.contains('\0') {
        return bad("contains a NUL byte");
    }
    if trimmed.is_empty() {
        return Ok("");
    }
    for comp in trimmed.split('/') {
        if comp.is_empty() {
            return bad("empty path component (`//`)");
        }
        if comp == "." || comp == ".." {
            return bad("`.` and `..` are not allowed");
        }
        if comp.len() > MAX_COMPONENT_LEN {
            return bad(&format!(
                "a component is longer than {MAX_COMPONENT_LEN} bytes"
            ));
        }
    }
    Ok(trimmed)
}

/// A normalized non-root name, or an error naming the root.
pub fn normalize_entry(name: &str) -> Result<String> {
    let n = normalize(name)?;
    if n.is_empty() {
        return Err(Error::InvalidName {
            name: name.to_string(),
            reason: "the root directory is not a file".into(),
        });
    }
    Ok(n)
}

/// Parent directory of a normalized name ("" for top-level names).
pub fn parent(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
}

/// Last component of a normalized name.
pub fn base(name: &str) -> &str {
    name.rfind('/').map_or(name, |i| &name[i + 1..])
}

/// The name `name` takes when `from` (a file or a directory with
/// everything below it) is renamed to `to`: `to` for `from` itself,
/// `to/rest` for `from/rest`, `None` for a name outside `from`. All three
/// are normalized names.
pub fn rebase(name: &str, from: &str, to: &str) -> Option<String> {
    let rest = name.strip_prefix(from)?;
    if rest.is_empty() {
        return Some(to.to_string());
    }
    rest.starts_with('/').then(|| format!("{to}{rest}"))
}

/// True when `name` is `dir` or below it.
pub fn is_within(name: &str, dir: &str) -> bool {
    rebase(name, dir, "").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_forms_and_rules() {
        assert_eq!(normalize("/db/CURRENT").unwrap(), "db/CURRENT");
        assert_eq!(normalize("db/").unwrap(), "db");
        assert_eq!(normalize("/").unwrap(), "");
        assert!(normalize("a//b").is_err());
        assert!(normalize("a/../b").is_err());
        assert!(normalize("a/./b").is_err());
        assert!(normalize("a\0b").is_err());
        assert!(normalize(&"x".repeat(256)).is_err());
        assert!(normalize(&"abc/".repeat(300)).is_err());
        assert!(normalize_entry("/").is_err());
        assert!(is_normal_entry("db/CURRENT") && is_normal_entry("x"));
        for bad in ["", "/db", "db/", "a//b", "a/../b", "a\0b"] {
            assert!(!is_normal_entry(bad), "{bad:?}");
        }
        assert_eq!(parent("a/b/c"), "a/b");
        assert_eq!(parent("c"), "");
        assert_eq!(base("a/b/c"), "c");
        assert_eq!(rebase("a/b/c", "a/b", "x").as_deref(), Some("x/c"));
        assert_eq!(rebase("a/b", "a/b", "x/y").as_deref(), Some("x/y"));
        assert_eq!(rebase("a/bc", "a/b", "x"), None);
        assert_eq!(rebase("a", "a/b", "x"), None);
        assert!(is_within("a/b/c", "a") && is_within("a", "a") && !is_within("ab", "a"));
    }
}
