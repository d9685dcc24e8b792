//! Small helpers every crate and tool of the workspace shares, so each has
//! one grammar and one implementation: byte sizes written as text, and a
//! seeded generator for workloads, fault plans and test data.
//!
//! Size grammar (device specs, BlobFS URIs, every command line): decimal
//! digits and an optional binary unit, case-insensitive: `B` (bytes), `K`,
//! `M`, `G`, `T`, or `KiB`, `MiB`, `GiB`, `TiB`. `KB`-style units are refused
//! as ambiguous. Surrounding whitespace is ignored.
//!
//! Invariants:
//! - `parse_size(&format_size(n)) == Ok(n)` for every `n`.
//! - A [`SplitMix64`] from the same seed gives the same sequence on every
//!   machine and build.

/// Parses a byte size such as `4096`, `64K`, `512MiB`, `2g` (see the module
/// docs for the grammar). The error names the text and what is wrong with it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("size {text:?} does not start with a number"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} does not fit in 64 bits"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            let u = unit[..1].to_ascii_uppercase();
            return Err(format!(
                "size {text:?}: unit {unit:?} is ambiguous; use {u} or {u}iB (binary units)"
            ));
        }
        _ => {
            return Err(format!(
                "size {text:?} has an unknown unit {unit:?} (use K, M, G, T or KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} does not fit in 64 bits"))
}

/// Writes `n` exactly, with the largest binary unit that divides it (`1G`,
/// `1536M`, `4097`); [`parse_size`] reads it back.
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Writes `n` for people, rounded to one decimal: `1536` is `1.5 KiB`,
/// `100` is `100 B`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// SplitMix64 (Steele, Lea and Flood): a tiny, fast, seeded generator, good
/// enough to spread offsets, plan faults and fill test data. Not for
/// anything that must be unpredictable.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed; every seed (0 included) is fine.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` by multiply-and-shift (bias below 2^-32 for any
    /// `n` under 2^32). `n == 0` gives 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// `len` random bytes from `seed`: the same seed gives the same bytes, so
    /// a reader can check data it did not keep.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        SplitMix64::new(seed).fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_every_form_the_tools_took() {
        for (text, n) in [
            ("4096", 4096),
            ("0", 0),
            ("12b", 12),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("1KiB", 1 << 10),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("2g", 2 << 30),
            ("1GiB", 1 << 30),
            ("3T", 3 << 40),
            (" 8M ", 8 << 20),
        ] {
            assert_eq!(parse_size(text), Ok(n), "{text:?}");
        }
    }

    #[test]
    fn bad_sizes_name_the_problem() {
        for (text, says) in [
            ("", "does not start with a number"),
            ("K", "does not start with a number"),
            ("-1", "does not start with a number"),
            ("1.5G", "unknown unit"),
            ("4X", "unknown unit"),
            ("16777216T", "64 bits"),
            ("4MB", "ambiguous"),
            ("99999999999999999999", "64 bits"),
            ("17179869184G", "64 bits"),
            ("1 G", "unknown unit"),
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn format_size_round_trips() {
        for n in [
            0,
            1,
            1023,
            1024,
            1536,
            4097,
            1 << 20,
            3 << 30,
            5 << 40,
            u64::MAX,
        ] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(512), "512");
    }

    #[test]
    fn human_sizes_round_to_one_decimal() {
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(576 << 20), "576.0 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn the_generator_is_seeded_and_spreads() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = SplitMix64::new(7);
        assert!(a.iter().all(|&x| x == r.next_u64()));
        assert_ne!(SplitMix64::new(8).next_u64(), a[0]);
        // The published first output for seed 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[r.below(10) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(r.below(0), 0);
        assert_eq!(SplitMix64::bytes(3, 13), SplitMix64::bytes(3, 13));
        assert_ne!(SplitMix64::bytes(3, 13), SplitMix64::bytes(4, 13));
        assert_eq!(&SplitMix64::bytes(3, 13)[..8], &SplitMix64::bytes(3, 8)[..]);
    }
}
