//! Signatures of what a device may already hold, so `init` (mkfs) does not
//! format over a file system, a partition table, an encrypted volume or
//! another blobstore by mistake.
//!
//! This module only reads: it knows where other formats put their magic
//! numbers and never writes them. Our own layout stays in `format.rs`;
//! the foreign offsets live here because they describe other software's
//! disks, are used for nothing but detection, and grow as a table.
//!
//! Invariants:
//! - [`identify`] looks only at the bytes it is given (a short device gives
//!   a short buffer) and never panics on any input.
//! - An all-zero device holds no signature; so does a device whose first
//!   [`PROBE_LEN`] bytes carry none of the magics below.
//! - Checks that share bytes run in a fixed order, most specific first
//!   (a FAT or NTFS boot sector and a GPT's protective MBR also end in
//!   0x55AA, so the plain DOS partition table is tried last).

use std::sync::Arc;

use crate::device::{channel, BlockDevice, Lba};
use crate::error::Result;
use crate::format;

/// Bytes from the start of the device that [`probe`] reads: enough for the
/// farthest signature known (btrfs's, at 64 KiB + 64) and a GPT header on
/// 4096-byte blocks. A multiple of 4096, so of every block size.
pub const PROBE_LEN: usize = 68 << 10;

/// Something found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// What it is, as a phrase that follows "it holds": `an ext4 file
    /// system`, `a GPT partition table`, `a blobstore of type "blobfs"`.
    pub what: String,
    /// Byte offset of the signature on the device.
    pub offset: u64,
    /// For a blobstore of ours, its type tag (empty for an untyped one);
    /// `None` for anything else.
    pub blobstore_type: Option<String>,
}

/// Reads the first [`PROBE_LEN`] bytes of `dev` (fewer on a smaller device)
/// and reports the first known signature among them.
pub async fn probe(dev: &Arc<dyn BlockDevice>) -> Result<Option<Signature>> {
    let geo = dev.geometry();
    let bs = geo.block_size as u64;
    let len = (PROBE_LEN as u64).min(geo.size_bytes()) / bs * bs;
    if len == 0 {
        return Ok(None);
    }
    let ch = channel(dev)?;
    let buf = ch
        .read(Lba(0), dev.alloc_buf_for_overwrite(len as usize)?)
        .await?;
    Ok(identify(&buf))
}

/// Synchronous [`probe`].
pub fn probe_sync(dev: &Arc<dyn BlockDevice>) -> Result<Option<Signature>> {
    crate::block_on(probe(dev))
}

/// How a blobstore type tag reads in a message: `a blobstore of type
/// "blobfs"`, or `an untyped blobstore`.
pub fn describe_blobstore(bstype: &str) -> String {
    if bstype.is_empty() {
        "an untyped blobstore".into()
    } else {
        format!("a blobstore of type {bstype:?}")
    }
}

fn at(head: &[u8], off: usize, magic: &[u8]) -> bool {
    head.get(off..off + magic.len()) == Some(magic)
}

fn le16(head: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(head.get(off..off + 2)?.try_into().ok()?))
}

fn le32(head: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(head.get(off..off + 4)?.try_into().ok()?))
}

fn found(what: impl Into<String>, offset: usize) -> Option<Signature> {
    Some(Signature {
        what: what.into(),
        offset: offset as u64,
        blobstore_type: None,
    })
}

// Offsets of the foreign signatures, from each format's documentation.
/// ext2/3/4: the super block starts at 1024; `s_magic` (0xEF53) is at +56.
const EXT_SUPER: usize = 1024;
const EXT_MAGIC_OFF: usize = EXT_SUPER + 56;
const EXT_MAGIC: u16 = 0xEF53;
const EXT_FEATURE_COMPAT: usize = EXT_SUPER + 0x5C;
const EXT_FEATURE_INCOMPAT: usize = EXT_SUPER + 0x60;
/// `COMPAT_HAS_JOURNAL`: ext3 (or later).
const EXT3_HAS_JOURNAL: u32 = 0x4;
/// `INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG`: ext4.
const EXT4_INCOMPAT: u32 = 0x40 | 0x80 | 0x200;
/// btrfs: the primary super block at 64 KiB, its magic at +64.
const BTRFS_MAGIC_OFF: usize = (64 << 10) + 64;
/// ISO 9660: the first volume descriptor at 32 KiB; "CD001" at +1.
const ISO_MAGIC_OFF: usize = (32 << 10) + 1;
/// The boot signature 0x55 0xAA that ends an MBR or a FAT/NTFS boot sector.
const BOOT_SIG_OFF: usize = 510;
/// FAT12/16 file-system type string, and FAT32's.
const FAT16_TYPE_OFF: usize = 54;
const FAT32_TYPE_OFF: usize = 82;
/// NTFS OEM id.
const NTFS_OEM_OFF: usize = 3;
/// The MBR partition table: four 16-byte entries.
const MBR_TABLE_OFF: usize = 446;
/// Page sizes whose last 10 bytes may carry a swap signature.
const SWAP_PAGE_SIZES: [usize; 4] = [4096, 8192, 16384, 65536];

/// The first known signature in `head`, the first bytes of a device.
pub fn identify(head: &[u8]) -> Option<Signature> {
    if at(head, 0, &format::SUPER_MAGIC) {
        let bstype = format::super_block_type(head).unwrap_or_default();
        return Some(Signature {
            what: describe_blobstore(&bstype),
            offset: 0,
            blobstore_type: Some(bstype),
        });
    }
    if at(head, 0, b"SPDKBLOB") {
        return found("an SPDK blobstore", 0);
    }
    if at(head, 0, b"LUKS\xba\xbe") {
        return found("a LUKS encrypted volume", 0);
    }
    if at(head, 0, b"XFSB") {
        return found("an XFS file system", 0);
    }
    if at(head, NTFS_OEM_OFF, b"NTFS    ") {
        return found("an NTFS file system", NTFS_OEM_OFF);
    }
    let boot_sig = at(head, BOOT_SIG_OFF, &[0x55, 0xAA]);
    if boot_sig {
        if at(head, FAT32_TYPE_OFF, b"FAT32   ") {
            return found("a FAT32 file system", FAT32_TYPE_OFF);
        }
        for (magic, name) in [
            (&b"FAT12   "[..], "a FAT12 file system"),
            (b"FAT16   ", "a FAT16 file system"),
            (b"FAT     ", "a FAT file system"),
        ] {
            if at(head, FAT16_TYPE_OFF, magic) {
                return found(name, FAT16_TYPE_OFF);
            }
        }
    }
    if at(head, BTRFS_MAGIC_OFF, b"_BHRfS_M") {
        return found("a btrfs file system", BTRFS_MAGIC_OFF);
    }
    if le16(head, EXT_MAGIC_OFF) == Some(EXT_MAGIC) {
        let compat = le32(head, EXT_FEATURE_COMPAT).unwrap_or(0);
        let incompat = le32(head, EXT_FEATURE_INCOMPAT).unwrap_or(0);
        let name = if incompat & EXT4_INCOMPAT != 0 {
            "an ext4 file system"
        } else if compat & EXT3_HAS_JOURNAL != 0 {
            "an ext3 file system"
        } else {
            "an ext2 file system"
        };
        return found(name, EXT_MAGIC_OFF);
    }
    if at(head, ISO_MAGIC_OFF, b"CD001") {
        return found("an ISO 9660 file system", ISO_MAGIC_OFF);
    }
    for page in SWAP_PAGE_SIZES {
        let off = page - 10;
        if at(head, off, b"SWAPSPACE2") || at(head, off, b"SWAP-SPACE") {
            return found("a Linux swap area", off);
        }
    }
    for lba_size in [512, 4096] {
        if at(head, lba_size, b"EFI PART") {
            return found("a GPT partition table", lba_size);
        }
    }
    if boot_sig && mbr_has_partition(head) {
        return found("a DOS (MBR) partition table", BOOT_SIG_OFF);
    }
    None
}

/// True when one of the four MBR entries looks like a partition: a boot
/// flag of 0x00 or 0x80, a non-zero type, a non-zero start and length.
fn mbr_has_partition(head: &[u8]) -> bool {
    (0..4).any(|i| {
        let e = MBR_TABLE_OFF + 16 * i;
        let Some(entry) = head.get(e..e + 16) else {
            return false;
        };
        let boot_ok = entry[0] == 0x00 || entry[0] == 0x80;
        let kind = entry[4];
        let start = le32(entry, 8).unwrap_or(0);
        let sectors = le32(entry, 12).unwrap_or(0);
        boot_ok && kind != 0 && start != 0 && sectors != 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> Vec<u8> {
        vec![0u8; PROBE_LEN]
    }

    fn put(mut b: Vec<u8>, off: usize, bytes: &[u8]) -> Vec<u8> {
        b[off..off + bytes.len()].copy_from_slice(bytes);
        b
    }

    fn what(b: &[u8]) -> (String, u64) {
        let s = identify(b).expect("a signature");
        (s.what, s.offset)
    }

    #[test]
    fn blank_and_short_devices_hold_nothing() {
        assert_eq!(identify(&blank()), None);
        assert_eq!(identify(&[]), None);
        assert_eq!(identify(&[0x55; 100]), None);
        // A boot signature without any plausible partition is not a table.
        assert_eq!(identify(&put(blank(), 510, &[0x55, 0xAA])), None);
    }

    #[test]
    fn each_signature_is_named_with_its_offset() {
        let ext2 = put(blank(), 1080, &[0x53, 0xEF]);
        assert_eq!(what(&ext2), ("an ext2 file system".into(), 1080));
        let ext3 = put(ext2.clone(), 1024 + 0x5C, &4u32.to_le_bytes());
        assert_eq!(what(&ext3).0, "an ext3 file system");
        let ext4 = put(ext3, 1024 + 0x60, &0x2c2u32.to_le_bytes());
        assert_eq!(what(&ext4), ("an ext4 file system".into(), 1080));
        assert_eq!(
            what(&put(blank(), 0, b"XFSB")),
            ("an XFS file system".into(), 0)
        );
        assert_eq!(
            what(&put(blank(), 65600, b"_BHRfS_M")),
            ("a btrfs file system".into(), 65600)
        );
        assert_eq!(
            what(&put(blank(), 512, b"EFI PART")),
            ("a GPT partition table".into(), 512)
        );
        assert_eq!(
            what(&put(blank(), 4096, b"EFI PART")),
            ("a GPT partition table".into(), 4096)
        );
        assert_eq!(
            what(&put(blank(), 4086, b"SWAPSPACE2")),
            ("a Linux swap area".into(), 4086)
        );
        assert_eq!(
            what(&put(blank(), 65526, b"SWAP-SPACE")),
            ("a Linux swap area".into(), 65526)
        );
        assert_eq!(
            what(&put(blank(), 0, b"LUKS\xba\xbe")),
            ("a LUKS encrypted volume".into(), 0)
        );
        assert_eq!(
            what(&put(blank(), 32769, b"CD001")),
            ("an ISO 9660 file system".into(), 32769)
        );
        assert_eq!(
            what(&put(blank(), 3, b"NTFS    ")),
            ("an NTFS file system".into(), 3)
        );
        assert_eq!(
            what(&put(blank(), 0, b"SPDKBLOB")),
            ("an SPDK blobstore".into(), 0)
        );
    }

    #[test]
    fn fat_needs_the_boot_signature() {
        let fat32 = put(blank(), 82, b"FAT32   ");
        assert_eq!(identify(&fat32), None);
        let fat32 = put(fat32, 510, &[0x55, 0xAA]);
        assert_eq!(what(&fat32), ("a FAT32 file system".into(), 82));
        let fat16 = put(put(blank(), 54, b"FAT16   "), 510, &[0x55, 0xAA]);
        assert_eq!(what(&fat16), ("a FAT16 file system".into(), 54));
    }

    #[test]
    fn mbr_needs_a_plausible_entry() {
        let sig = put(blank(), 510, &[0x55, 0xAA]);
        // Entry 2: type 0x83 (Linux), start 2048, 100000 sectors.
        let mut entry = [0u8; 16];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
        entry[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        let mbr = put(sig.clone(), 446 + 16, &entry);
        assert_eq!(what(&mbr), ("a DOS (MBR) partition table".into(), 510));
        // A bad boot flag or an empty length is not a partition.
        let mut bad = entry;
        bad[0] = 0x42;
        assert_eq!(identify(&put(sig.clone(), 446, &bad)), None);
        let mut empty = entry;
        empty[12..16].fill(0);
        assert_eq!(identify(&put(sig, 446, &empty)), None);
    }

    #[test]
    fn our_own_blobstore_names_its_type() {
        let mut sb = blank();
        sb[..8].copy_from_slice(&format::SUPER_MAGIC);
        let s = identify(&sb).unwrap();
        assert_eq!(s.what, "an untyped blobstore");
        assert_eq!(s.blobstore_type.as_deref(), Some(""));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = crate::util::SplitMix64::new(0x9E37_79B9_7F4A_7C15);
        for len in [0, 1, 509, 511, 512, 1081, 4095, 32770, 65607, PROBE_LEN] {
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            let _ = identify(&buf);
        }
    }
}
